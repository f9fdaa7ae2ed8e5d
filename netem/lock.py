"""One emulation at a time per host: concurrent runs share the cores and the forwarding path, and each one's
timings are then contaminated by the other's.

:class:`EmulationLock` takes an exclusive ``flock`` on ``/run/compactbed/emulation.lock`` (released by the kernel
when the process dies, so a killed run never blocks the next) and records who holds it. A run that is refused
is told which run holds the lock. With ``force`` it goes ahead; every run registers itself in
``/run/compactbed/active/<pid>.json`` for its lifetime, so :meth:`EmulationLock.others` tells each run, forced or
not, whether another emulation ran beside it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .cluster import STATE_DIR, pid_alive


class EmulationBusy(RuntimeError):
    """Another emulation holds this host; the message names it."""


class EmulationLock:
    """Context manager: the host's emulation lock (or, with ``force``, a registration without it)."""

    def __init__(self, what: str, force: bool = False, state_dir: Path = STATE_DIR):
        self.what, self.force = what, force
        self.path = state_dir / "emulation.lock"
        self.active = state_dir / "active"
        self.me = self.active / f"{os.getpid()}.json"
        self._fd: int | None = None
        self.seen: dict[int, str] = {}        # other runs seen alive while this one held or waited on the host

    def __enter__(self) -> "EmulationLock":
        self.active.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            busy = self._holder()
        else:
            self._fd, busy = fd, "; ".join(self.others().values())     # forced runs hold no lock
        if busy and not self.force:
            self.__exit__()
            raise EmulationBusy(f"another emulation is running on this host: {busy}; wait for it to end, or pass "
                                f"--force to run anyway (the results are then marked contaminated)")
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.write(self._fd, json.dumps(self._record()).encode())
        self.me.write_text(json.dumps(self._record()))
        self.others()
        return self

    def __exit__(self, *exc) -> None:
        self.others()
        self.me.unlink(missing_ok=True)
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _record(self) -> dict:
        return dict(pid=os.getpid(), what=self.what, started=time.strftime("%Y-%m-%d %H:%M:%S"))

    def _holder(self) -> str:
        try:
            d = json.loads(self.path.read_text())
            return f"pid {d['pid']}, {d['what']} (since {d['started']})"
        except (OSError, ValueError, KeyError):
            return "a process whose record could not be read"

    def others(self) -> dict[int, str]:
        """Other emulations alive now, added to :attr:`seen` (every one seen while this run was registered)."""
        for f in self.active.glob("*.json"):
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            pid = d.get("pid")
            if pid == os.getpid():
                continue
            if pid_alive(pid):
                self.seen[pid] = f"pid {pid}, {d.get('what')} (since {d.get('started')})"
            else:
                f.unlink(missing_ok=True)          # a registration left by a killed run
        return self.seen

    @property
    def contaminated(self) -> str:
        """Why this run's timings are not its own ('' when no other emulation was seen)."""
        return "; ".join(f"ran beside {w}" for w in self.seen.values())
