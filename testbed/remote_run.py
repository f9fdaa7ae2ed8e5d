"""``scenario run`` on a ``hosts:`` scenario: every method on real machines over SSH, into the same results folder
an emulated run writes.

1. Single-process reference images on the coordinator (quality is computed there).
2. Log into every host at once; one preflight table of every problem (versions, GPUs, tc/netem, clocks) before
   anything starts.
3. A work folder per host, the job files copied into it; each host's NIC shaped with the scenario's links
   (``remote.shape``: tc netem, or htb alone for rate-only links where the kernel lacks netem).
4. One torchrun per host (c10d rendezvous on host 0); host 0's progress is streamed; as each job ends its files
   are copied back from every host and its row is written.
5. Teardown on every host, also on errors, Ctrl-C and a lost host: processes, qdiscs, work folders.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import asyncssh
import numpy as np
from rich.console import Console
from rich.table import Table

from ..netem.probe import PORT, LinkProbe, bulk_bytes, measured
from ..runtime.records import MethodResult, RunState
from ..scenarios.schema import Scenario
from . import remote as R
from .hosts import machine_links, shaping_commands, torchrun_argv, write_jobs
from .launch import RUN_LINE, STEP_LINE, RunFailed
from .report import add_speedups, collect, print_table, write_plots, write_summary
from .run import checked_model, new_results, recorded, references, row_recorder


def _rate_only(commands: list[list[str]]) -> list[list[str]]:
    """The shaping commands with each netem leaf replaced by a FIFO (kernels without sch_netem; rate-only links)."""
    out = []
    for c in commands:
        if "netem" in c:
            c = c[:c.index("netem")] + ["pfifo", "limit", "1000"]
        out.append(c)
    return out


async def _shape(scenario: Scenario, host: R.Host, pass_name: str) -> str:
    """Shape the host's NIC for a pass: the scenario's links (shaped), the same with the rate lifted (bound), or
    nothing at all (ideal)."""
    if host.shaped:             # the previous pass's tree goes first (htb's root cannot be changed in place)
        await R.run(host, [*host.sudo, "tc", "qdisc", "del", "dev", host.node.interface, "root"], timeout=15)
        host.shaped = False
    if pass_name == "ideal":
        return "none"
    cmds = shaping_commands(scenario, host.index, unlimited_rate=pass_name == "bound")
    how = "tc netem"
    if not host.report.get("netem"):
        cmds, how = _rate_only(cmds), "htb rate (no sch_netem)"
    host.shaped = True
    for c in cmds:
        await R.run(host, [*host.sudo, *c], timeout=15)
    return how


async def _probe(src: R.Host, dst: R.Host, spec, back) -> LinkProbe:
    """One directed path between hosts, probed as emulated links are (netem.probe's ping-pong and bulk transfer)."""
    py, port, nbytes = src.remote.python, PORT, bulk_bytes(spec)
    server = await dst.conn.create_process(shlex.join([py, "-m", "compactbed.netem.probe", "serve", "--port",
                                                       str(port)]), stderr=asyncssh.STDOUT)
    try:
        await asyncio.wait_for(server.stdout.readline(), 30)
        out = await R.run(src, [py, "-m", "compactbed.netem.probe", "client", dst.node.host, "--port", str(port),
                                "--bytes", str(nbytes)], timeout=120)
        m = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.terminate()
        server.close()
    return measured(src.index, dst.index, spec, back, nbytes, m)


async def _probe_all(scenario: Scenario, hosts: list[R.Host], results: Path, console: Console,
                     accept_link_error: bool) -> list[str]:
    """Probe every path between hosts (links.json); paths that miss the scenario's profile stop the run unless
    accepted (shaped runs only: unshaped, the probes are a record of the network as it is)."""
    _, links, _, _ = machine_links(scenario)
    probes = []
    for (i, j), spec in sorted(links.items()):
        probes.append(await _probe(hosts[i], hosts[j], spec, links.get((j, i), spec)))
    (results / "links.json").write_text(json.dumps(
        [asdict(p) | {"rate_error": p.rate_error, "misses": p.misses} for p in probes], indent=1))
    t = Table(title="paths between hosts (probed before the run)")
    for col in ("path", "configured", "wire Mbit/s", "RTT ms", "configured RTT ms", "check"):
        t.add_column(col)
    shaped = scenario.remote.shape
    for p in probes:
        t.add_row(f"{p.src}->{p.dst}", links[(p.src, p.dst)].describe() if shaped else "as it is",
                  f"{p.wire_mbit:.1f}", f"{p.rtt_ms:.2f}", f"{p.configured_rtt_ms:.2f}" if shaped else "-",
                  ("; ".join(p.misses) or "ok") if shaped else "-")
    console.print(t)
    missed = [f"{p.src}->{p.dst}: {'; '.join(p.misses)}" for p in probes if shaped and p.misses]
    if missed and not accept_link_error:
        raise RunFailed(f"{len(missed)} path(s) between hosts miss their profile: {missed[0]} (pass "
                        f"--accept-link-error to run anyway, recorded in summary.json)")
    return missed


def _preflight_table(hosts: list[R.Host], issues: list[tuple[str, str]]) -> Table:
    t = Table(title="hosts (preflight)")
    for col in ("host", "ranks", "python", "compactbed", "torch", "GPUs", "NCCL", "tc", "netem", "clock", "problems"):
        t.add_column(col)
    for h in hosts:
        r = h.report
        t.add_row(h.name, str(len(h.ranks)), str(r.get("python")), str(r.get("compactbed")), str(r.get("torch")),
                  str(r.get("gpus", "-")), str(r.get("nccl") or "-"), "yes" if r.get("tc") else "no",
                  "yes" if r.get("netem") else "no", f"{r.get('clock_offset_s', 0.0):+.2f} s",
                  "; ".join(p for n, p in issues if n == h.name) or "ok")
    return t


class _Pass:
    """One torchrun per host over the pass's jobs; rows as the jobs end."""

    def __init__(self, scenario: Scenario, hosts: list[R.Host], results: Path, pass_name: str, jobs, refs, model,
                 console: Console, done):
        self.s, self.hosts, self.results, self.pass_name = scenario, hosts, results, pass_name
        self.jobs, self.refs, self.model, self.console, self.done = jobs, refs, model, console, done
        self.finished: set[int] = set()
        self.current = 0
        self.started = time.monotonic()

    async def finish(self, j: int) -> None:
        from ..runtime.quality import compare

        if j in self.finished:
            return
        local = self.jobs[j][0].parent
        for h in self.hosts:
            await R.fetch_dir(h, self.jobs[j][1][h.index].out_dir, local)
        if not (local / "run.json").is_file():
            return
        self.finished.add(j)
        job = self.jobs[j][1][0]
        row = collect(local, job.method, job.seed)
        row.links = self.pass_name
        row.quality = compare(np.load(local / "images.npy"), self.refs[job.seed][0], self.s.conditions,
                              self.model.classifier)
        self.done(row)

    async def follow(self, host: R.Host, proc, log) -> int | None:
        async for line in proc.stdout:
            if line.startswith("PGID "):
                host.groups.append(int(line.split()[1]))
                continue
            log.write(line)
            log.flush()
            if host.index != 0:
                continue
            m = RUN_LINE.match(line)
            if m:
                i = int(m.group(1))
                if i > 1:
                    await self.finish(i - 2)
                self.current, self.started = i - 1, time.monotonic()
                job = self.jobs[i - 1][1][0]
                self.console.print(f"{self.pass_name}: {job.method.name} (seed {job.seed}) [{i}/{len(self.jobs)}]")
            m = STEP_LINE.match(line)
            if m and int(m.group(1)) in {1, int(m.group(2)) // 2, int(m.group(2))}:
                self.console.print(f"  step {m.group(1)}/{m.group(2)}")
        await proc.wait()
        return proc.exit_status

    async def run(self) -> None:
        endpoint = f"{self.s.nodes[0].host}:{await R.free_port(self.hosts[0])}"
        tasks, logs = [], []
        try:
            for h in self.hosts:
                files = [self.jobs[j][2][h.index] for j in range(len(self.jobs))]
                argv = torchrun_argv(self.s, h.index, files, self.s.remote.python, endpoint)
                env = ["OMP_NUM_THREADS=1", "PYTHONUNBUFFERED=1", f"GLOO_SOCKET_IFNAME={h.node.interface}"]
                inner = f"echo PGID $$; exec {shlex.join(['env', *env, *argv])}"
                cmd = f"cd {shlex.quote(h.workdir)} && exec setsid -w sh -c {shlex.quote(inner)}"
                proc = await h.conn.create_process(cmd, stderr=asyncssh.STDOUT)
                logs.append(open(self.results / self.pass_name / f"host{h.index}.log", "w"))
                tasks.append(asyncio.create_task(self.follow(h, proc, logs[-1])))
            limit = self.s.timeout_s * 4 + 60
            while True:
                done = [t for t in tasks if t.done()]
                if len(done) == len(tasks) or any(t.exception() or t.result() != 0 for t in done):
                    break
                if time.monotonic() > self.started + limit:
                    raise RunFailed(f"timed out after {limit:.0f} s (a rank hung or a host is unreachable)")
                await asyncio.sleep(0.2)
            # one host failed: give the others their collective timeout (and SSH its keepalives) to end as well
            await asyncio.wait(tasks, timeout=self.s.timeout_s + 20)
            lost = [h.name for h, t in zip(self.hosts, tasks)
                    if t.done() and (t.exception() is not None or t.result() is None)]
            if lost:
                raise RunFailed(f"{', '.join(lost)} lost (its SSH connection closed or it stopped answering "
                                f"mid-run); the other hosts' ranks were stopped")
            codes = [t.result() if t.done() else "running" for t in tasks]
            if any(c != 0 for c in codes):
                await self.finish(self.current)
                raise RunFailed(self.reason(codes))
        finally:
            for t in tasks:
                t.cancel()
            for log in logs:
                log.close()
            for j in range(len(self.jobs)):
                if j not in self.finished:
                    try:
                        await asyncio.wait_for(self.finish(j), 60)
                    except (asyncio.TimeoutError, OSError):
                        pass

    def reason(self, codes) -> str:
        errors = sorted(self.results.rglob("rank*.error"), key=lambda f: f.stat().st_mtime)
        for err in errors:
            lines = [x for x in err.read_text().splitlines() if x.strip()]
            if lines:
                return f"{err.stem} failed: {lines[-1].strip()[:300]}"
        return f"hosts' torchrun exited with codes {codes}"


async def _run(scenario: Scenario, results: Path, console: Console, backend: str, state: RunState, rows: list,
               meta: dict, save, accept_link_error: bool) -> None:
    model = checked_model(scenario)
    refs = references(model, scenario, results, console, meta)
    run_id = uuid.uuid4().hex[:8]
    hosts = [R.Host(i, scenario.nodes[m[0]], m, scenario.remote) for i, m in enumerate(scenario.machines)]
    try:
        await asyncio.gather(*(R.connect(h) for h in hosts))
        await asyncio.gather(*(R.preflight(h) for h in hosts))
        local = json.loads(await asyncio.to_thread(_local_report))
        _, links, access, _ = machine_links(scenario)
        needs_netem = any(x.delay_ms or x.jitter_ms or x.loss_pct for x in [*links.values(), *(access or [])])
        issues = R.problems(hosts, local, scenario.remote.shape, needs_netem)
        console.print(_preflight_table(hosts, issues))
        if issues:
            raise R.HostError(f"{len(issues)} problem(s) on the hosts (table above); first: {issues[0][0]}: "
                              f"{issues[0][1]}")
        env = json.loads((results / "environment.json").read_text())
        for h in hosts:
            h.workdir = f"{scenario.remote.workdir.rstrip('/')}/{scenario.name}-{run_id}/host{h.index}"
            await R.run(h, ["mkdir", "-p", h.workdir])
        passes = meta["passes"]
        for pass_name in passes:
            how = await asyncio.gather(*(_shape(scenario, h, pass_name) for h in hosts)) \
                if scenario.remote.shape else ["unshaped (remote.shape: false)"]
            if pass_name == passes[0]:
                env |= {"hosts": [h.report | {"name": h.name} for h in hosts], "topology": scenario.topology,
                        "link_mode": f"hosts ({', '.join(sorted(set(how)))})"}
                (results / "environment.json").write_text(json.dumps(env, indent=1))
                state.link_errors = await _probe_all(scenario, hosts, results, console, accept_link_error)
            await _run_pass(scenario, hosts, results, pass_name, backend, refs, model, console, state, rows, save)
    finally:
        left = await asyncio.gather(*(R.teardown(h) for h in hosts), return_exceptions=True)
        for h, x in zip(hosts, left):
            if x:
                console.print(f"[yellow]teardown on {h.name} incomplete:[/] {x}")


async def _run_pass(scenario: Scenario, hosts: list[R.Host], results: Path, pass_name: str, backend: str, refs,
                    model, console: Console, state: RunState, rows: list, save) -> None:
    """One pass: its job files on every host, one torchrun per host, a row per job as it ends (failed rows for the
    jobs a failure left unrun)."""
    jobs = []
    for job_file, job in write_jobs(scenario, results, backend, pass_name=pass_name):
        rel = Path(job_file).parent.relative_to(results)
        per_host = {h.index: job.model_copy(update={"out_dir": f"{h.workdir}/{rel}"}) for h in hosts}
        paths = {h.index: f"{per_host[h.index].out_dir}/job.json" for h in hosts}
        jobs.append((job_file, per_host, paths))
        for h in hosts:
            tmp = job_file.with_suffix(f".host{h.index}.json")
            tmp.write_text(per_host[h.index].model_dump_json(indent=1))
            await R.put(h, tmp, paths[h.index])
            tmp.unlink()

    try:
        await _Pass(scenario, hosts, results, pass_name, jobs, refs, model, console,
                    row_recorder(rows, state, save)).run()
    except RunFailed as e:
        got = {(r.links, r.method, r.seed) for r in rows}
        for _, per_host, _ in jobs:
            job = per_host[0]
            if (pass_name, job.method.name, job.seed) not in got:
                rows.append(MethodResult(method=job.method.name, seed=job.seed, links=pass_name, status="failed",
                                         error=str(e)))
        raise


def _local_report() -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", R.PREFLIGHT], capture_output=True, text=True, check=True).stdout


def run_on_hosts(scenario: Scenario, output: Path, console: Console, backend: str = "auto",
                 accept_link_error: bool = False, bound: bool = True, ideal: bool = True
                 ) -> tuple[Path, list[MethodResult]]:
    """Run the scenario on its hosts; the results folder has the emulated layout: passes shaped, bound (the rate
    lifted, delays kept) and ideal (no shaping), or one ``unshaped`` pass with ``remote.shape: false``."""
    results = new_results(scenario, output, "hosts")
    passes = ["shaped", *(["bound"] if bound else []), *(["ideal"] if ideal else [])] if scenario.remote.shape \
        else ["unshaped"]
    console.print(f"[bold]{scenario.name}[/]: {scenario.world_size} ranks on {len(scenario.machines)} hosts, "
                  f"{len(scenario.methods)} methods, {scenario.steps} steps; passes: {', '.join(passes)} -> {results}")
    state, rows = RunState(), []
    meta = dict(scenario=scenario.name, link_mode="hosts", passes=passes)

    def save() -> None:
        add_speedups(rows)
        write_summary(results, rows, meta, state)

    save()
    with recorded(state, save):
        asyncio.run(_run(scenario, results, console, backend, state, rows, meta, save, accept_link_error))
    write_plots(results, rows)
    print_table(rows, console, f"{scenario.name}: hosts")
    console.print(f"results: {results} ({state.describe()})")
    return results, rows
