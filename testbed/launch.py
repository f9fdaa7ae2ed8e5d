"""Start the ranks of one method run, follow their progress, and always reap them.

Ranks run under ``torchrun`` in a new session (process group) so the whole tree can be signalled at once; on a
timeout, Ctrl-C or any failure the group gets SIGTERM, then SIGKILL. A failed run raises :class:`RunFailed` with
the first rank's error, read from the ``rank*.error`` files the engine writes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

STEP_LINE = re.compile(r"^STEP (\d+)/(\d+)")


class RunFailed(RuntimeError):
    """A method run did not finish; the message is the reason (rank error, timeout, exit code)."""


@dataclass(frozen=True)
class RankCommand:
    """One process to start: argv, optional wrapper (e.g. ``ip netns exec NS``), and extra environment."""

    argv: list[str]
    prefix: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENGINE = "compactbed.runtime.engine"


def local_torchrun(job_file: Path, world: int, threads: int = 1, module: str = ENGINE) -> list[RankCommand]:
    """All ranks on this machine over loopback: one torchrun with ``world`` processes running ``module``."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0",
            "-m", module, str(job_file)]
    return [RankCommand(argv, env=(("OMP_NUM_THREADS", str(threads)),))]


def node_torchrun(job_file: Path, world: int, prefixes: Sequence[tuple[str, ...]], master_addr: str,
                  interface: str, threads: int = 1, module: str = ENGINE) -> list[RankCommand]:
    """One torchrun per node (static rendezvous), each started through its node's prefix
    (e.g. ``ip netns exec NS``); gloo is pinned to the node's interface."""
    port = free_port()
    return [RankCommand([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--nnodes={world}",
                         f"--node_rank={k}", f"--master_addr={master_addr}", f"--master_port={port}",
                         "--max_restarts=0", "-m", module, str(job_file)],
                        prefix=tuple(prefixes[k]),
                        env=(("OMP_NUM_THREADS", str(threads)), ("GLOO_SOCKET_IFNAME", interface)))
            for k in range(world)]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def run_ranks(commands: Sequence[RankCommand], run_dir: Path, timeout_s: float,
              on_step: Callable[[int, int], None] | None = None) -> float:
    """Run the commands to completion; returns wall seconds. Raises RunFailed on any failure."""
    procs: list[subprocess.Popen] = []
    logs, readers = [], []
    t0 = time.perf_counter()
    try:
        for i, cmd in enumerate(commands):
            log = open(run_dir / f"launcher{i}.log", "w")
            logs.append(log)
            env = dict(os.environ) | dict(cmd.env) | {"PYTHONUNBUFFERED": "1"}
            procs.append(subprocess.Popen([*cmd.prefix, *cmd.argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, text=True, start_new_session=True))
        readers = [threading.Thread(target=_follow, args=(p, log, on_step if i == 0 else None), daemon=True)
                   for i, (p, log) in enumerate(zip(procs, logs))]
        for r in readers:
            r.start()
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break        # one launcher failed: stop the others instead of waiting for their timeout
            if time.monotonic() > deadline:
                raise RunFailed(f"timed out after {timeout_s:.0f} s (a rank hung or a peer is unreachable); "
                                f"ranks were killed")
            time.sleep(0.05)
        codes = [p.poll() for p in procs]
        failed = any(c != 0 for c in codes)
    finally:
        for p in procs:
            _kill_group(p)
        for r in readers:
            if r.ident is not None:
                r.join(timeout=5)
        for log in logs:
            log.close()
    if failed:
        raise RunFailed(_failure_reason(run_dir, codes))
    return time.perf_counter() - t0


def _follow(proc: subprocess.Popen, log, on_step) -> None:
    for line in proc.stdout:
        log.write(line)
        log.flush()          # the log is live: progress can be followed while the run goes on
        m = STEP_LINE.match(line)
        if m and on_step is not None:
            on_step(int(m.group(1)), int(m.group(2)))


_SOURCE_TAG = re.compile(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")   # gloo's "[/path/file.cc:129] " prefix
_KILLED = re.compile(r"failed \(exitcode: -(\d+)\) local_rank: (\d+)")   # torchrun's root-cause line


def _failure_reason(run_dir: Path, codes: list) -> str:
    """The most specific reason: a rank killed by a signal, else a rank's own error, else exit codes."""
    logs = [log.read_text() for log in sorted(run_dir.glob("launcher*.log"))]
    for text in logs:
        m = _KILLED.search(text)
        if m:
            num = int(m.group(1))
            sig = signal.Signals(num).name if num in {s.value for s in signal.Signals} else f"signal {num}"
            return f"rank {m.group(2)} was killed by {sig} mid-run; the other ranks were stopped"
    for err in sorted(run_dir.glob("rank*.error")):
        lines = [l for l in err.read_text().strip().splitlines() if l.strip()]
        if lines:
            text = _SOURCE_TAG.sub("", lines[-1].strip())
            if "Timed out" in text or "timed out" in text:
                return f"{err.stem}: a collective timed out (peer unreachable or link down): {text[:240]}"
            return f"{err.stem} failed: {text[:300]}"
    for text in logs:
        errs = [l for l in text.splitlines() if "Error" in l and not l.startswith(" ")]
        if errs:
            return f"launcher: {errs[-1].strip()[:300]}"
    return f"ranks exited with codes {codes}"
