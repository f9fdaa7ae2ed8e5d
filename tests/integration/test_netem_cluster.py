"""Emulated clusters on this machine (root): shaped rate and delay match the profile, and everything created
is removed again, also after a crash, without touching anything else."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from compactbed.netem.cluster import STATE_DIR, EmulatedCluster, check_backend, cleanup_stale, list_namespaces
from compactbed.netem.probe import probe_link
from compactbed.netem.profiles import LinkSpec

pytestmark = [pytest.mark.root, pytest.mark.slow]
CHECK = check_backend() if os.geteuid() == 0 else None
needs_shaping = pytest.mark.skipif(CHECK is None or CHECK.backend is None,
                                   reason=f"no link emulation here: {CHECK.reason if CHECK else 'not root'}")


def ours():
    return {ns for ns in list_namespaces() if ns.startswith("cbed-")}


@needs_shaping
@pytest.mark.parametrize("spec", [LinkSpec(rate_mbit=100, delay_ms=10), LinkSpec(rate_mbit=20, delay_ms=2),
                                  LinkSpec(rate_mbit=500, delay_ms=1, jitter_ms=0.5)], ids=lambda s: s.describe())
def test_shaped_link_matches_profile_within_5_percent(spec):
    before = ours()
    links = {(0, 1): spec, (1, 0): spec}
    with EmulatedCluster(2, links, CHECK.backend) as c:
        assert ours() - before == set(c.namespaces)
        p = probe_link(c, 0, 1, spec)
    assert abs(p.rate_error) < 0.05, p
    # uniform +-jitter per direction: the median RTT may sit below 2 x delay by up to 2 x jitter
    assert -2 * spec.jitter_ms <= p.rtt_ms - 2 * spec.delay_ms < 1.5 + 2 * spec.jitter_ms, p
    assert ours() == before


@needs_shaping
def test_teardown_on_error_inside_the_block():
    before = ours()
    with pytest.raises(RuntimeError, match="boom"):
        with EmulatedCluster(3, {(0, 1): LinkSpec(delay_ms=5)}, CHECK.backend) as c:
            state = json.loads(c.state_file.read_text())
            assert set(state["namespaces"]) == set(c.namespaces) and state["pids"]   # delay line recorded
            delay_line = c.delay_proc
            raise RuntimeError("boom")
    assert ours() == before and not c.state_file.exists()
    assert delay_line.poll() is not None and c.delay_proc is None


@needs_shaping
def test_cleanup_after_a_crash_removes_only_what_was_recorded():
    foreign = f"cbed-foreign-{os.getpid()}"            # our prefix, but in no state file: must survive
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    code = ("from compactbed.netem.cluster import EmulatedCluster\n"
            "from compactbed.netem.profiles import LinkSpec\n"
            "import sys, time\n"
            "c = EmulatedCluster(2, {(0, 1): LinkSpec(delay_ms=3)}, sys.argv[1]).__enter__()\n"
            "print(c.names.run_id, flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, CHECK.backend], stdout=subprocess.PIPE, text=True)
    try:
        run_id = proc.stdout.readline().strip()
        assert run_id and (STATE_DIR / f"{run_id}.json").exists()
        os.kill(proc.pid, signal.SIGKILL)                  # the owner dies without tearing down
        proc.wait(10)
        time.sleep(0.2)
        leftovers = {ns for ns in ours() if run_id in ns}
        assert len(leftovers) == 3
        removed = cleanup_stale()
        assert leftovers <= set(removed)
        assert not {ns for ns in ours() if run_id in ns}
        assert foreign in list_namespaces()
        assert not (STATE_DIR / f"{run_id}.json").exists()
    finally:
        proc.kill()
        subprocess.run(["ip", "netns", "del", foreign], check=False)


def test_backend_check_explains_itself():
    check = check_backend()
    assert check.reason
    if os.geteuid() != 0:
        assert check.backend is None and "not root" in check.reason
    else:
        assert check.backend in ("netem", "fallback") or "not installed" in check.reason
