"""Emulated clusters: build namespaces and shaped links, and always remove exactly what was built.

:class:`EmulatedCluster` is a context manager. Before creating anything it writes a state file
(``/run/compactbed/<run id>.json``) listing the namespaces and processes it will own, so a crashed run can be
cleaned up later by :func:`cleanup_stale` (``scenario netem cleanup``). Teardown kills the recorded delay-line
process and every process inside the recorded namespaces, then deletes the namespaces (which removes their
qdiscs and iptables rules with them). Nothing outside the recorded names is ever touched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from . import commands as C
from .profiles import LinkSpec

STATE_DIR = Path("/run/compactbed")
CC_SYSCTL = "/proc/sys/net/ipv4/tcp_congestion_control"


class NetemError(RuntimeError):
    """Link emulation could not be set up; the message names the failing command and why."""


@dataclass(frozen=True)
class BackendCheck:
    """Which shaping backend this machine supports (None: none) and why."""

    backend: C.Backend | None
    reason: str
    details: tuple[str, ...] = ()


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise NetemError(f"`{cmd[0]}` is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetemError(f"`{' '.join(cmd)}` did not finish in 30 s") from None
    if check and r.returncode != 0:
        raise NetemError(f"`{' '.join(cmd)}` failed: {(r.stderr or r.stdout).strip()[:300]}")
    return r


def check_backend() -> BackendCheck:
    """Probe (in a throwaway namespace of our own) whether real netem or the fallback can shape links."""
    details = []
    if os.geteuid() != 0:
        return BackendCheck(None, "not root: network namespaces and tc need root (runs fall back to unshaped "
                                  "loopback)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return BackendCheck(None, f"`{tool}` is not installed (apt-get install -y iproute2)")
    probe = f"cbed-probe-{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
    except NetemError as e:
        return BackendCheck(None, f"cannot create network namespaces: {e}")
    try:
        _run(["ip", "-n", probe, "link", "set", "lo", "up"])
        ok_htb = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:",
                       "htb"], check=False).returncode == 0
        details.append(f"htb: {'yes' if ok_htb else 'no'}")
        if not ok_htb:
            return BackendCheck(None, "the kernel has no htb qdisc (sch_htb)", tuple(details))
        _run(["ip", "netns", "exec", probe, "tc", "qdisc", "del", "dev", "lo", "root"], check=False)
        r = _run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                 check=False)
        details.append(f"netem: {'yes' if r.returncode == 0 else 'no (' + r.stderr.strip()[:80] + ')'}")
        if r.returncode == 0:
            return BackendCheck("netem", "the kernel has sch_netem: real tc netem for delay, jitter, loss and rate",
                                tuple(details))
        if shutil.which("iptables") is None:
            return BackendCheck(None, "no netem in this kernel and `iptables` is not installed for the fallback "
                                      "(apt-get install -y iptables)", tuple(details))
        r = _run(["ip", "netns", "exec", probe, "iptables", "-w", "-A", "OUTPUT", "-o", "lo", "-j", "NFQUEUE",
                  "--queue-num", "1", "--queue-bypass"], check=False)
        details.append(f"iptables NFQUEUE: {'yes' if r.returncode == 0 else 'no'}")
        if r.returncode != 0:
            return BackendCheck(None, f"no netem, and iptables NFQUEUE failed: {r.stderr.strip()[:120]}", tuple(details))
        return BackendCheck("fallback", "no sch_netem in this kernel: htb for rate, iptables statistic for loss, "
                                        "NFQUEUE delay line for delay/jitter", tuple(details))
    finally:
        _run(["ip", "netns", "del", probe], check=False)


class EmulatedCluster:
    """N node namespaces around a hub, with one LinkSpec per directed path. ``access``: each node's access link
    (a star: shared uplink and downlink; the paths then are what the access links compose to), except the
    ``own_paths`` shaped on their own; None: every path on its own (a mesh). ``congestion_control``: the TCP
    algorithm set in every node ("cubic" falls back to reno where the namespace may not use it; "host": leave
    the host's); what is in force, and why, is in ``congestion``."""

    def __init__(self, n: int, links: dict[tuple[int, int], LinkSpec], backend: C.Backend,
                 access: list[LinkSpec] | None = None, own_paths: Iterable[tuple[int, int]] = (),
                 congestion_control: str = "host", run_id: str | None = None,
                 log: Callable[[str], None] | None = None):
        if not 1 <= n <= 250:
            raise ValueError(f"an emulated cluster has 1..250 nodes, got {n}")
        if access is not None and len(access) != n:
            raise ValueError(f"{len(access)} access links for {n} nodes")
        self.n, self.links, self.backend = n, links, backend
        self.access, self.own_paths, self.congestion_control = access, tuple(own_paths), congestion_control
        self.congestion: dict[str, str] = {}
        self.names = C.Names(run_id or secrets.token_hex(3))
        self.log = log or (lambda s: None)
        self.state_file = STATE_DIR / f"{self.names.run_id}.json"
        self.delay_proc: subprocess.Popen | None = None
        self.commands_run: list[list[str]] = []

    # --- names --------------------------------------------------------------------------------------------
    @property
    def namespaces(self) -> list[str]:
        return [self.names.node(k) for k in range(self.n)] + [self.names.hub]

    def prefix(self, k: int) -> tuple[str, ...]:
        """Command prefix that runs a process on node k."""
        return ("ip", "netns", "exec", self.names.node(k))

    def address(self, k: int) -> str:
        return C.node_ip(k)

    # --- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> "EmulatedCluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(dict(
            run_id=self.names.run_id, owner_pid=os.getpid(), namespaces=self.namespaces,
            pids=[self.delay_proc.pid] if self.delay_proc else [], created=time.time())))

    def up(self) -> None:
        t0 = time.perf_counter()
        self._save_state()
        cmds = C.cluster_commands(self.names, self.n, self.links, self.backend, self.access, self.own_paths,
                                  ethtool=shutil.which("ethtool") is not None)
        for cmd in cmds:
            _run(cmd)
            self.commands_run.append(cmd)
        self.congestion = self._set_congestion_control()
        if self.backend == "fallback":
            self._start_delay_line()
        self._save_state()
        self.log(f"emulated cluster {self.names.run_id}: {self.n} nodes, {len(self.links)} links, backend "
                 f"{self.backend}, up in {time.perf_counter() - t0:.2f} s")

    def reshape(self, links: dict[tuple[int, int], LinkSpec], access: list[LinkSpec] | None = None) -> None:
        """Shape the running cluster's links anew: its namespaces, addresses and the connections of the processes
        in them stay; the old shaping and delay line go, the new ones come, and the nodes forget the TCP metrics
        (round trips, slow-start thresholds) they cached per peer, as new namespaces would."""
        lossy = C.needs_offloads_off(links.values()) != C.needs_offloads_off(self.links.values())
        if lossy or (access is None) != (self.access is None) or set(links) != set(self.links):
            raise NetemError("reshape keeps the nodes, the topology and the offload setting (lossy or not); build "
                             "a new cluster for these links")
        t0 = time.perf_counter()
        self._stop_delay_line()
        cmds = C.unshaping_commands(self.names, self.n, star=self.access is not None)
        cmds += C.shaping_commands(self.names, self.n, links, self.backend, access, self.own_paths, ethtool=False)
        for cmd in cmds:
            _run(cmd)
            self.commands_run.append(cmd)
        for k in range(self.n):
            _run(["ip", "-n", self.names.node(k), "tcp_metrics", "flush", "all"], check=False)
        self.links, self.access = links, access
        if self.backend == "fallback":
            self._start_delay_line()
        self._save_state()
        self.log(f"emulated cluster {self.names.run_id}: reshaped in {time.perf_counter() - t0:.2f} s")

    def sysctl(self, key: str) -> str:
        """A sysctl's value in the nodes (node 0's)."""
        return _run(["ip", "netns", "exec", self.names.node(0), "sysctl", "-n", key]).stdout.strip()

    def set_sysctl(self, key: str, value: str) -> str:
        """Set a per-namespace sysctl in every node; returns the value in force (NetemError if refused)."""
        for k in range(self.n):
            r = _run(["ip", "netns", "exec", self.names.node(k), "sysctl", "-qw", f"{key}={value}"], check=False)
            if r.returncode:
                raise NetemError(f"{key}={value} refused in the node namespaces: {(r.stderr or r.stdout).strip()}")
        found = self.sysctl(key)
        if found != str(value):
            raise NetemError(f"{key}={value} set, but the nodes run {found}")
        return found

    def in_force(self, k: int) -> str:
        """The TCP congestion control algorithm in force in node k's namespace."""
        return _run(["ip", "netns", "exec", self.names.node(k), "cat", CC_SYSCTL]).stdout.strip()

    def _set_congestion_control(self) -> dict[str, str]:
        want, reason = self.congestion_control, ""
        if want != "host":
            err = self._try_congestion_control(want)
            if err and want == "cubic":
                reason = f"cubic refused in the node namespaces ({err}), so reno, the kernel's fallback"
                want, err = "reno", self._try_congestion_control("reno")
            if err:
                raise NetemError(f"congestion control {want!r} cannot be set in the node namespaces: {err}")
        found = {self.in_force(k) for k in range(self.n)}
        if want != "host" and found != {want}:
            raise NetemError(f"congestion control {want!r} set, but the nodes run {', '.join(sorted(found))}")
        out = dict(requested=self.congestion_control, in_force=found.pop())
        if reason:
            self.log(f"congestion control: {reason}")
            out["reason"] = reason
        return out

    def _try_congestion_control(self, algorithm: str) -> str:
        """Set ``algorithm`` in every node; '' when done, else why not (with what the host offers)."""
        for k in range(self.n):
            r = _run(["ip", "netns", "exec", self.names.node(k), "sysctl", "-qw",
                      f"net.ipv4.tcp_congestion_control={algorithm}"], check=False)
            if r.returncode:
                offered = {f: _read(Path("/proc/sys/net/ipv4") / f) for f in
                           ("tcp_available_congestion_control", "tcp_allowed_congestion_control")}
                return (f"{(r.stderr or r.stdout).strip()[:120]}; available: {offered['tcp_available_congestion_control']}"
                        f"; allowed in namespaces: {offered['tcp_allowed_congestion_control']}")
        return ""

    def _start_delay_line(self) -> None:
        specs = C.delay_line_specs(self.n, self.links)
        if not specs:
            return
        self.delay_proc = subprocess.Popen(
            ["ip", "netns", "exec", self.names.hub, sys.executable, "-m", "compactbed.netem.delay_line", *specs],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            start_new_session=True)
        self._save_state()
        line = self.delay_proc.stdout.readline()      # queue-bypass lets packets through undelayed until bound
        if not line.startswith("ready"):
            rest = self.delay_proc.stdout.read() if self.delay_proc.poll() is not None else ""
            raise NetemError(f"delay line did not start: {(line + rest).strip()[:300]}")

    def _stop_delay_line(self) -> None:
        if self.delay_proc is not None and self.delay_proc.poll() is None:
            self.delay_proc.send_signal(signal.SIGTERM)
            try:
                self.delay_proc.wait(3)
            except subprocess.TimeoutExpired:
                self.delay_proc.kill()
                self.delay_proc.wait(3)
        self.delay_proc = None

    def down(self) -> None:
        """Remove everything this cluster created; safe to call twice and after a partial setup."""
        self._stop_delay_line()
        remove_namespaces(self.namespaces)
        self.state_file.unlink(missing_ok=True)


def remove_namespaces(namespaces: list[str]) -> list[str]:
    """Kill every process in the given namespaces, then delete them; returns those that existed."""
    existing = set(list_namespaces())
    mine = [ns for ns in namespaces if ns in existing and ns.startswith("cbed-")]
    for ns in mine:
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    if mine:
        time.sleep(0.1)
    for ns in mine:
        _run(["ip", "netns", "del", ns], check=False)
    return mine


def list_namespaces() -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def cleanup_stale() -> list[str]:
    """Remove what crashed runs left: only namespaces and processes recorded in our state files, and only
    for runs whose owner process is gone. Returns what was removed."""
    removed = []
    if not STATE_DIR.is_dir():
        return removed
    for f in sorted(STATE_DIR.glob("*.json")):
        try:
            state = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if pid_alive(state.get("owner_pid")):
            continue
        for pid in state.get("pids", []):
            if pid_alive(pid) and "compactbed.netem.delay_line" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)
                removed.append(f"pid {pid}")
        removed += remove_namespaces(list(state.get("namespaces", [])))
        f.unlink(missing_ok=True)
    return removed


def pid_alive(pid) -> bool:
    """Whether a process with this id exists (on this host)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return "?"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
