"""SSH to the machines of a ``hosts:`` scenario (asyncssh): connect, check, run, copy files, clean up.

Logins are key-based and non-interactive (no passwords, no agent prompts); host keys are verified against the
scenario's ``remote.known_hosts`` unless it is null. Every process started on a host runs in its own session, so it
is stopped as a group; every folder and qdisc made on a host is recorded on its :class:`Host` and removed by
:func:`teardown`.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import asyncssh

from ..scenarios.schema import NodeSpec, RemoteSpec
from .launch import RunFailed

# What a host reports about itself (run with its own interpreter): versions, GPUs, NCCL, tc and netem, its clock.
PREFLIGHT = r"""
import json, os, platform, shutil, time
out = {"python": platform.python_version(), "time": time.time()}
try:
    from importlib import metadata
    out["compactbed"] = metadata.version("compactbed")
except Exception as e:
    out["compactbed"] = None
try:
    import torch
    out["torch"] = torch.__version__
    out["gpus"] = torch.cuda.device_count()
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if out["gpus"] else None
except Exception as e:
    out["torch"] = None
rel = os.uname().release
mods = ["/lib/modules/%s/kernel/net/sched/sch_netem.ko%s" % (rel, x) for x in ("", ".xz", ".zst", ".gz")]
out["tc"] = shutil.which("tc") or (os.path.exists("/usr/sbin/tc") and "/usr/sbin/tc")
loaded = open("/proc/modules").read() if os.path.exists("/proc/modules") else ""
out["netem"] = any(os.path.exists(m) for m in mods) or "sch_netem" in loaded
out["root"] = os.geteuid() == 0
print(json.dumps(out))
"""


class HostError(RunFailed):
    """A host cannot be used or was lost; the message names it."""


@dataclass
class Host:
    """One machine: its number (torchrun's node rank), the ranks it runs, how to reach it, and what this run made
    on it."""

    index: int
    node: NodeSpec
    ranks: list[int]
    remote: RemoteSpec
    workdir: str = ""                     # this run's folder on the host
    conn: asyncssh.SSHClientConnection | None = None
    report: dict = field(default_factory=dict)
    shaped: bool = False
    groups: list[int] = field(default_factory=list)   # process groups started on it

    @property
    def name(self) -> str:
        return f"host {self.index} ({self.node.name}, {self.node.host})"

    @property
    def sudo(self) -> list[str]:
        return [] if self.report.get("root") else ["sudo", "-n"]


async def connect(host: Host) -> None:
    r, node = host.remote, host.node
    known = None if r.known_hosts is None else str(Path(r.known_hosts).expanduser())
    given = {"username": node.ssh_user} if node.ssh_user else {}
    if node.ssh_key:
        given["client_keys"] = [str(Path(node.ssh_key).expanduser())]
    try:
        host.conn = await asyncio.wait_for(asyncssh.connect(
            node.host, port=node.ssh_port, known_hosts=known, agent_path=None, password=None, kbdint_auth=False,
            connect_timeout=r.connect_timeout_s, keepalive_interval=5, keepalive_count_max=3, **given),
            r.connect_timeout_s + 5)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
        raise HostError(f"{host.name}: cannot log in over SSH: {str(e) or type(e).__name__}") from None


async def run(host: Host, argv: list[str], check: bool = True, timeout: float = 60) -> asyncssh.SSHCompletedProcess:
    """One command on the host (argv quoted for its shell); ``check``: a non-zero exit raises HostError."""
    if host.conn is None:
        raise HostError(f"{host.name}: not connected")
    try:
        result = await asyncio.wait_for(host.conn.run(shlex.join(argv), check=False), timeout)
    except (OSError, asyncssh.Error, asyncio.TimeoutError) as e:
        raise HostError(f"{host.name}: lost while running {argv[0]}: {str(e) or type(e).__name__}") from None
    if check and result.exit_status != 0:
        err = (result.stderr or result.stdout or "").strip().splitlines()
        raise HostError(f"{host.name}: {shlex.join(argv)[:120]} failed: {err[-1] if err else result.exit_status}")
    return result


async def preflight(host: Host) -> dict:
    """The host's versions, GPUs, tc/netem and clock offset (its clock minus the coordinator's, the round trip
    halved)."""
    t0 = time.time()
    result = await run(host, [host.remote.python, "-c", PREFLIGHT], check=False)
    t1 = time.time()
    try:
        host.report = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        host.report = {"error": (result.stderr or result.stdout or "no output").strip()[-200:]}
        return host.report
    host.report["clock_offset_s"] = host.report["time"] - (t0 + t1) / 2
    return host.report


def problems(hosts: list[Host], local: dict, shaping: bool, needs_netem: bool) -> list[tuple[str, str]]:
    """(host, problem) for everything that stops the run, found from the preflight reports."""
    out = []
    for h in hosts:
        r = h.report
        if "error" in r:
            out.append((h.name, f"{h.remote.python} cannot run the preflight: {r['error']}"))
            continue
        for key in ("python", "compactbed", "torch"):
            if r.get(key) != local.get(key):
                out.append((h.name, f"{key} {r.get(key)} (coordinator: {local.get(key)})"))
        if len(h.ranks) > 1 and r.get("gpus") and r["gpus"] < len(h.ranks):
            out.append((h.name, f"{len(h.ranks)} ranks but {r['gpus']} GPUs"))
        if shaping and not r.get("tc"):
            out.append((h.name, "no tc (iproute2) to shape its NIC (or set remote.shape: false)"))
        if shaping and needs_netem and not r.get("netem"):
            out.append((h.name, "the kernel has no sch_netem: the links' delay, jitter or loss cannot be shaped "
                                "there (rate alone can; or set remote.shape: false)"))
        if abs(r.get("clock_offset_s", 0.0)) > 5:
            out.append((h.name, f"clock {r['clock_offset_s']:+.1f} s off the coordinator's (sync it: NTP)"))
    return out


async def free_port(host: Host) -> int:
    """A TCP port free on the host now (for the rendezvous it hosts)."""
    code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
    return int((await run(host, [host.remote.python, "-c", code])).stdout.strip())


async def put(host: Host, local: Path, remote: str) -> None:
    try:
        async with host.conn.start_sftp_client() as sftp:
            await sftp.makedirs(str(PurePosixPath(remote).parent), exist_ok=True)
            await sftp.put(str(local), remote)
    except (OSError, asyncssh.Error) as e:
        raise HostError(f"{host.name}: cannot copy {local.name} there over SFTP (is its sshd's sftp subsystem on?): "
                        f"{str(e) or type(e).__name__}") from None


async def fetch_dir(host: Host, remote: str, local: Path) -> list[str]:
    """Copy the files of one remote folder (not recursive) into ``local``; returns their names."""
    local.mkdir(parents=True, exist_ok=True)
    try:
        async with host.conn.start_sftp_client() as sftp:
            if not await sftp.isdir(remote):
                return []
            names = [n for n in await sftp.listdir(remote) if n not in (".", "..")]
            files = [n for n in names if await sftp.isfile(f"{remote}/{n}")]
            for n in files:
                await sftp.get(f"{remote}/{n}", str(local / n))
            return files
    except (OSError, asyncssh.Error):
        return []


async def stop_groups(host: Host) -> None:
    for sig in ("TERM", "KILL"):
        for g in host.groups:
            await run(host, ["kill", f"-{sig}", "--", f"-{g}"], check=False, timeout=10)
        if sig == "TERM" and host.groups:
            await asyncio.sleep(2)
    host.groups.clear()


async def teardown(host: Host) -> list[str]:
    """Stop what this run started on the host, remove its qdisc and folder; returns what could not be done."""
    if host.conn is None:
        return []
    left = []
    for step in ("processes", "qdisc", "folder"):
        try:
            if step == "processes":
                await stop_groups(host)
            elif step == "qdisc" and host.shaped:
                await run(host, [*host.sudo, "tc", "qdisc", "del", "dev", host.node.interface, "root"], timeout=15)
                host.shaped = False
            elif step == "folder" and host.workdir:
                await run(host, ["rm", "-rf", "--", host.workdir], timeout=30)
        except HostError as e:
            left.append(str(e))
    host.conn.close()
    host.conn = None
    return left
