"""A results folder never looks finished when it is not: a killed run is marked interrupted and cleaned up by the
next one, a second emulation is refused (or, forced, marked contaminated), and a link the host cannot emulate
stops the run unless accepted."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console

from compactbed.netem.cluster import check_backend, list_namespaces
from compactbed.netem.lock import EmulationBusy
from compactbed.runtime.records import read_state
from compactbed.scenarios.schema import load_scenario
from compactbed.simulator.runs import read_runs, unusable
from compactbed.testbed.passes import LinkCheckFailed
from compactbed.testbed.run import run_scenario

pytestmark = [pytest.mark.root, pytest.mark.slow]
CHECK = check_backend() if os.geteuid() == 0 else None
pytestmark.append(pytest.mark.skipif(CHECK is None or CHECK.backend is None, reason="needs link emulation"))

HOLD = """
import sys, time
from compactbed.netem.lock import EmulationLock
with EmulationLock("the test's holder"):
    print("held", flush=True)
    time.sleep(120)
"""


def scenario_file(tmp_path, name="state", **kw):
    data = dict(name=name, nodes=2, labels=4, steps=2, guidance=1.0, methods=["ring"], output="out",
                link={"rate_mbit": 50, "delay_ms": 2}, warmup={"mode": "local", "steps": 1}, timeout_s=30) | kw
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def ours():
    return {ns for ns in list_namespaces() if ns.startswith("cbed-")}


@pytest.fixture
def holder():
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_killed_run_is_marked_interrupted_and_the_next_run_cleans_up_after_it(tmp_path, report):
    before = ours()
    path = scenario_file(tmp_path, "killed", steps=50, link={"rate_mbit": 20, "delay_ms": 2})
    proc = subprocess.Popen([sys.executable, "-m", "compactbed.testbed.cli", "run", str(path), "--no-bound", "--no-ideal"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not any("STEP 2/" in f.read_text() for f in tmp_path.glob("out/*/shaped/launcher0.log")):
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            subprocess.run([sys.executable, "-m", "compactbed.testbed.cli", "netem", "cleanup"], capture_output=True)
            pytest.fail("the run never reached step 2")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (folder,) = (tmp_path / "out").iterdir()
    state = read_state(folder)
    assert state.state == "interrupted" and "killed" in state.reason, state
    assert json.loads((folder / "summary.json").read_text())["state"]["state"] == "running"   # as the kill left it
    assert ours() - before, "a SIGKILLed run leaves its namespaces until the next run"
    assert unusable([tmp_path / "out"]) == [(folder, state)] and read_runs([tmp_path / "out"]) == []

    console = Console(record=True, width=200)
    run_scenario(load_scenario(scenario_file(tmp_path, "next")), tmp_path / "next", console, bound=False, ideal=False)
    assert "removed what killed runs left" in console.export_text()
    assert ours() == before
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "out")], capture_output=True).stdout == b""
    report(f"SIGKILL mid-run: folder marked '{state.state}' ({state.reason}); the next run removed what it left")


def test_a_second_emulation_is_refused_or_marked_contaminated(tmp_path, holder, report):
    scenario = load_scenario(scenario_file(tmp_path))
    with pytest.raises(EmulationBusy, match=f"pid {holder.pid}, the test's holder"):
        run_scenario(scenario, tmp_path / "refused", Console(quiet=True))
    assert not (tmp_path / "refused").exists()                  # refused before anything was created
    results, rows = run_scenario(scenario, tmp_path / "forced", Console(quiet=True), bound=False, ideal=False, force=True)
    state = read_state(results)
    assert state.state == "complete" and f"pid {holder.pid}" in state.contaminated and not state.usable
    assert [r.ok for r in rows] == [True] and read_runs([tmp_path / "forced"]) == []
    report(f"concurrent emulation: refused naming pid {holder.pid}; forced: marked '{state.contaminated}'")


def test_a_link_the_host_cannot_emulate_stops_the_run_unless_accepted(tmp_path, report):
    scenario = load_scenario(scenario_file(tmp_path, link={"rate_mbit": 100_000, "delay_ms": 2}))
    with pytest.raises(LinkCheckFailed, match="miss their profile") as e:
        run_scenario(scenario, tmp_path / "strict", Console(quiet=True), bound=False, ideal=False)
    (folder,) = (tmp_path / "strict").iterdir()
    assert read_state(folder).state == "failed" and not list(folder.glob("shaped/ring"))
    results, _ = run_scenario(scenario, tmp_path / "accepted", Console(quiet=True), bound=False, ideal=False,
                              accept_link_error=True)
    state = read_state(results)
    assert state.state == "complete" and state.link_errors and state.usable
    (run,) = read_runs([tmp_path / "accepted"])
    assert run.off_profile and all(p["wire_mbit"] < 90_000 for p in run.off_profile)
    report(f"100 Gbit link on this host: {str(e.value)[:110]}; accepted and recorded: {state.link_errors[0][:80]}")
