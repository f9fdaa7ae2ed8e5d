"""Start the ranks of a pass of method runs, follow their progress, and always reap them.

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
RUN_LINE = re.compile(r"^RUN (\d+)/(\d+)")
LINKS_LINE = re.compile(r"^LINKS (\d+)/(\d+)")


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


def _files(job_files: Path | Sequence[Path]) -> list[str]:
    return [str(job_files)] if isinstance(job_files, (str, Path)) else [str(f) for f in job_files]


def local_torchrun(job_files: Path | Sequence[Path], world: int, threads: int = 1, module: str = ENGINE
                   ) -> list[RankCommand]:
    """All ranks on this machine over loopback: one torchrun with ``world`` processes running ``module`` on the
    job files in turn."""
    argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "--max_restarts=0",
            "-m", module, *_files(job_files)]
    return [RankCommand(argv, env=(("OMP_NUM_THREADS", str(threads)),))]


def node_torchrun(job_files: Path | Sequence[Path], world: int, prefixes: Sequence[tuple[str, ...]],
                  master_addr: str, interface: str, threads: int = 1, module: str = ENGINE) -> list[RankCommand]:
    """One torchrun per node (static rendezvous), each started through its node's prefix
    (e.g. ``ip netns exec NS``); gloo is pinned to the node's interface."""
    port = free_port()
    return [RankCommand([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--nnodes={world}",
                         f"--node_rank={k}", f"--master_addr={master_addr}", f"--master_port={port}",
                         "--max_restarts=0", "-m", module, *_files(job_files)],
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
              on_step: Callable[[int, int], None] | None = None,
              on_run: Callable[[int, int], None] | None = None, log_prefix: str = "launcher",
              on_links: Callable[[int, int], None] | None = None) -> float:
    """Run the commands to completion; returns wall seconds. Raises RunFailed on any failure, with the reason
    found in this launch's logs (``run_dir/<log_prefix><i>.log``) and the rank errors written under ``run_dir``
    since it started. ``timeout_s`` bounds each job of the launch (its clock restarts at every ``RUN i/N`` line,
    which ``on_run`` also receives); ``on_links`` receives ``LINKS i/N`` lines (job i waits for new links)."""
    procs: list[subprocess.Popen] = []
    logs, readers = [], []
    t0, t_wall = time.perf_counter(), time.time()
    started = [time.monotonic()]

    def run_started(i: int, n: int) -> None:
        started[0] = time.monotonic()
        if on_run is not None:
            on_run(i, n)

    try:
        for i, cmd in enumerate(commands):
            log = open(run_dir / f"{log_prefix}{i}.log", "w")
            logs.append(log)
            env = dict(os.environ) | dict(cmd.env) | {"PYTHONUNBUFFERED": "1"}
            procs.append(subprocess.Popen([*cmd.prefix, *cmd.argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, text=True, start_new_session=True))
        readers = [threading.Thread(target=_follow, args=(p, log, *((on_step, run_started, on_links) if i == 0 else
                                                                    (None, None, None))),
                                    daemon=True) for i, (p, log) in enumerate(zip(procs, logs))]
        for r in readers:
            r.start()
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break        # one launcher failed: stop the others instead of waiting for their timeout
            if time.monotonic() > started[0] + timeout_s:
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
        raise RunFailed(_failure_reason(run_dir, codes, log_prefix, t_wall))
    return time.perf_counter() - t0


def _follow(proc: subprocess.Popen, log, on_step, on_run, on_links) -> None:
    for line in proc.stdout:
        log.write(line)
        log.flush()          # the log is live: progress can be followed while the run goes on
        for pattern, callback in ((STEP_LINE, on_step), (RUN_LINE, on_run), (LINKS_LINE, on_links)):
            m = pattern.match(line)
            if m and callback is not None:
                callback(int(m.group(1)), int(m.group(2)))


_SOURCE_TAG = re.compile(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*")   # gloo's "[/path/file.cc:129] " prefix
_KILLED = re.compile(r"failed \(exitcode: -(\d+)\) local_rank: (\d+)")   # torchrun's root-cause line


def _failure_reason(run_dir: Path, codes: list, log_prefix: str = "launcher", since: float = 0.0) -> str:
    """The most specific reason: a rank killed by a signal, else the first rank error written under ``run_dir``
    since ``since`` (the root cause; the other ranks' follow from it), else exit codes."""
    logs = [log.read_text() for log in sorted(run_dir.glob(f"{log_prefix}*.log"))]
    for text in logs:
        m = _KILLED.search(text)
        if m:
            num = int(m.group(1))
            sig = signal.Signals(num).name if num in {s.value for s in signal.Signals} else f"signal {num}"
            return f"rank {m.group(2)} was killed by {sig} mid-run; the other ranks were stopped"
    errors = sorted((f for f in run_dir.rglob("rank*.error") if f.stat().st_mtime >= since - 1),
                    key=lambda f: (f.stat().st_mtime, f.name))
    for err in errors:
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
