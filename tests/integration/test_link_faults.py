"""Faults on emulated links: loss and jitter give a correct result; a link that goes down mid-run gives a
clear error in bounded time, keeps the results written so far, and leaves nothing behind."""

import json
import os
import subprocess
import threading
import time

import pytest
import yaml
from rich.console import Console

from compactbed.netem.cluster import check_backend, list_namespaces
from compactbed.runtime.records import read_state
from compactbed.testbed.run import run_scenario
from compactbed.scenarios.schema import load_scenario

pytestmark = [pytest.mark.root, pytest.mark.slow]
CHECK = check_backend() if os.geteuid() == 0 else None
pytestmark.append(pytest.mark.skipif(CHECK is None or CHECK.backend is None, reason="needs link emulation"))


def scenario_file(tmp_path, **kw):
    data = dict(name="fault", nodes=2, labels=8, steps=4, guidance=1.0, methods=["ring", "compact-1bit"],
                warmup={"mode": "local", "steps": 1}, output="out", timeout_s=10) | kw
    p = tmp_path / "fault.yaml"
    p.write_text(yaml.safe_dump(data))
    return load_scenario(p)


def ours():
    return {ns for ns in list_namespaces() if ns.startswith("cbed-")}


def test_loss_and_jitter_still_give_the_correct_result(tmp_path, report):
    sc = scenario_file(tmp_path, link={"rate_mbit": 50, "delay_ms": 5, "jitter_ms": 3, "loss_pct": 1})
    before = ours()
    t0 = time.monotonic()
    results, rows = run_scenario(sc, tmp_path / "out", Console(quiet=True), bound=False, ideal=False)
    took = time.monotonic() - t0
    by = {r.method: r for r in rows}
    assert all(r.status == "ok" for r in rows), [r.error for r in rows]
    assert by["ring"].quality["max_abs_diff"] < 1e-4             # TCP recovers every lost packet: exact
    assert by["compact-1bit"].base_consistency["mismatched"] == 0
    assert ours() == before
    report(f"loss 1% + jitter +-3 ms on 50 Mbit/5 ms: ring exact (max diff {by['ring'].quality['max_abs_diff']:.1e}), "
           f"compact-1bit bases consistent, {took:.0f} s, nothing left behind")


def test_link_down_mid_run_fails_clearly_and_keeps_partial_results(tmp_path, report):
    sc = scenario_file(tmp_path, link={"rate_mbit": 20, "delay_ms": 2}, steps=30,
                       methods=["compact-1bit", "ring"])
    before = ours()
    downed = {}

    def cut_link_when_ring_runs():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not downed:
            logs = list((tmp_path / "out").glob("*/shaped/launcher0.log"))    # the pass: compact-1bit, then ring
            if logs and "STEP 3/" in logs[0].read_text().partition("RUN 2/2")[2]:
                hub = next(ns for ns in ours() - before if ns.endswith("-hub"))
                subprocess.run(["ip", "-n", hub, "link", "set", "nfh1", "down"], check=True)
                downed["t"] = time.monotonic()
            time.sleep(0.1)

    cutter = threading.Thread(target=cut_link_when_ring_runs, daemon=True)
    cutter.start()
    results, rows = run_scenario(sc, tmp_path / "out", Console(quiet=True), bound=False, ideal=False)
    cutter.join(5)
    assert downed, "the link was never cut"
    took = time.monotonic() - downed["t"]
    by = {r.method: r for r in rows}
    assert by["compact-1bit"].status == "ok"                       # finished before the cut: kept
    assert by["ring"].status == "failed" and by["ring"].error
    assert took < 3 * sc.timeout_s + 15                            # bounded by the collective timeout
    summary = json.loads((results / "summary.json").read_text())
    assert {r["method"]: r["status"] for r in summary["rows"]} == {"compact-1bit": "ok", "ring": "failed"}
    assert (results / "shaped" / "compact-1bit" / "seed0" / "images.npy").is_file()
    assert ours() == before
    report(f"link down mid-run (ring, step 3): failed after {took:.0f} s with '{by['ring'].error[:90]}'; "
           f"earlier compact-1bit results intact; nothing left behind")


def test_ctrl_c_tears_everything_down(tmp_path, report):
    """SIGINT (Ctrl-C) to `scenario run` mid-method: exit 130 in bounded time, no namespaces or ranks left."""
    import signal
    import sys

    path = tmp_path / "int.yaml"
    path.write_text(yaml.safe_dump(dict(name="int", nodes=2, labels=8, steps=200, guidance=1.0, methods=["ring"],
                                        link={"rate_mbit": 20, "delay_ms": 2}, output="out", timeout_s=30)))
    before = ours()
    # SIGINT as a terminal delivers it: a suite started as a background job of a non-interactive shell inherits
    # SIGINT ignored, and so would the command
    proc = subprocess.Popen([sys.executable, "-m", "compactbed.testbed.cli", "run", str(path), "--no-bound", "--no-ideal"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        logs = list(tmp_path.glob("out/*/shaped/launcher0.log"))
        if logs and "STEP 2/" in logs[0].read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the run never reached step 2")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:       # show where it is stuck (the CLI dumps its stacks on SIGUSR1)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        out, _ = proc.communicate()
        subprocess.run([sys.executable, "-m", "compactbed.testbed.cli", "netem", "cleanup"], capture_output=True)
        pytest.fail(f"no exit within 60 s of SIGINT; its stacks:\n{out[-6000:]}")
    took = time.monotonic() - t0
    assert proc.returncode == 130, out[-500:]
    assert ours() == before
    (folder,) = (tmp_path / "out").iterdir()
    assert read_state(folder).state == "interrupted"
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "out")], capture_output=True, text=True).stdout.split()
    assert leftover == []
    report(f"Ctrl-C mid-run: exit 130 after {took:.1f} s; namespaces and rank processes removed")
