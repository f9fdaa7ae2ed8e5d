"""One emulation at a time per host: a second run is refused with the holder's name, --force runs it marked
contaminated, and a killed holder blocks nobody."""

import signal
import subprocess
import sys
import time

import pytest

from compactbed.netem.lock import EmulationBusy, EmulationLock

HOLD = """
import sys, time
from pathlib import Path
from compactbed.netem.lock import EmulationLock
with EmulationLock("scenario A -> results/a", state_dir=Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def test_a_second_emulation_is_refused_and_named(tmp_path, holder):
    with pytest.raises(EmulationBusy, match=rf"pid {holder.pid}, scenario A -> results/a.*--force"):
        with EmulationLock("scenario B", state_dir=tmp_path):
            pass


def test_force_runs_beside_it_and_is_marked_contaminated(tmp_path, holder):
    with EmulationLock("scenario B", force=True, state_dir=tmp_path) as lock:
        assert f"pid {holder.pid}" in lock.contaminated and "scenario A" in lock.contaminated


def test_a_killed_holder_blocks_nobody(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    time.sleep(0.05)
    with EmulationLock("scenario B", state_dir=tmp_path) as lock:
        assert lock.contaminated == ""
    assert list((tmp_path / "active").iterdir()) == []           # the killed run's registration is gone too
