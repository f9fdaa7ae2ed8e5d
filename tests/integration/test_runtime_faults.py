"""Failures end with a clear error in bounded time and leave no processes behind."""

import os
import signal
import time

import psutil
import pytest

from compactbed.testbed.launch import RunFailed

from .conftest import scenario

pytestmark = pytest.mark.slow


def job_dir(tmp_path):
    """The folder of the launch fixture's (only) job."""
    return next(tmp_path.glob("launch*/*/"))


def engine_processes(run_dir):
    """Processes of this run: torchrun and its rank workers (their command lines name the job file)."""
    job = str(run_dir / "job.json")
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if job in cmd:
            procs.append(p)
    return procs


def test_killed_rank_gives_a_clear_error_and_no_leftovers(launch, tmp_path, report):
    sc = scenario(nodes=2, steps=40)
    killed = {}

    def kill_one_rank(step, total):
        if step == 3 and not killed:
            run_dir = job_dir(tmp_path)
            workers = [p for p in engine_processes(run_dir) if "torch.distributed.run" not in " ".join(p.cmdline())]
            assert workers, "no rank processes found"
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed["t"] = time.monotonic()

    with pytest.raises(RunFailed) as e:
        launch(sc, "ring", on_step=kill_one_rank, timeout_s=120)
    assert killed and time.monotonic() - killed["t"] < 60          # bounded: no hang after the kill
    msg = str(e.value)
    assert "was killed by SIGKILL mid-run" in msg, msg
    run_dir = job_dir(tmp_path)
    time.sleep(0.5)
    assert engine_processes(run_dir) == []
    assert not (run_dir / "run.json").exists()                     # nothing pretends to be a result
    report(f"rank killed (SIGKILL) at step 3: '{msg}' after {time.monotonic() - killed['t']:.1f} s; "
           f"no processes left")


def test_timeout_kills_the_whole_run(launch, tmp_path, report):
    sc = scenario(nodes=2, steps=400)
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match="timed out after 8 s"):
        launch(sc, "ring", timeout_s=8)
    took = time.monotonic() - t0
    assert took < 30
    time.sleep(0.5)
    assert engine_processes(job_dir(tmp_path)) == []
    report(f"run exceeding its 8 s limit: stopped after {took:.1f} s, no processes left")
