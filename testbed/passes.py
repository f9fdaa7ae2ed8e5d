"""Link passes of an emulated run: the cluster, its probes, and the launches that run every (pass, seed, method).

The shaped pass's cluster is built and probed; the bound (rate unlimited, delay kept) and ideal (no shaping, no added
delay) passes reshape it in place while the ranks wait between jobs, so one launch runs them all, unless their links
need the other segmentation-offload setting (lossy or not), which takes a cluster and a launch of its own.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..netem.cluster import EmulatedCluster
from ..netem.commands import NODE_IF, needs_offloads_off
from ..netem.probe import probe_link
from ..runtime.engine import Job
from ..runtime.models import DiTModel
from ..runtime.records import MethodResult, RunState
from ..scenarios.schema import Scenario
from .launch import RunFailed, local_torchrun, node_torchrun, run_ranks
from .report import collect


class LinkCheckFailed(RunFailed):
    """A shaped link missed its profile; the run did not start its methods."""


def pass_links(scenario: Scenario, name: str) -> tuple[dict, list | None]:
    """The directed links and access links of a link pass (shaped, bound: rate unlimited, ideal: no shaping)."""
    bound, ideal = name == "bound", name == "ideal"
    return (scenario.directed_links(unlimited_rate=bound, ideal=ideal),
            scenario.access_links(unlimited_rate=bound, ideal=ideal))


def launch_groups(scenario: Scenario, passes: list[str]) -> list[list[str]]:
    """Consecutive link passes that one emulated cluster takes in place (the same segmentation-offload setting:
    lossy links or none) share it and one launch of the ranks."""
    groups: list[tuple[list[str], bool]] = []
    for name in passes:
        lossy = name != "loopback" and needs_offloads_off(pass_links(scenario, name)[0].values())
        if groups and groups[-1][1] == lossy:
            groups[-1][0].append(name)
        else:
            groups.append(([name], lossy))
    return [g for g, _ in groups]


@contextlib.contextmanager
def link_passes(scenario: Scenario, names: list[str], backend, console: Console, results: Path, state: RunState,
                accept_link_error: bool = False) -> Iterator[tuple[Callable, Callable[[str], None] | None]]:
    """Yield (job files -> rank commands, reshape for a pass) with the cluster of the first pass ``names`` up (if
    any). The shaped pass first probes the paths that check every shaped link (``Scenario.probe_paths``;
    ``links.json``); links that miss their profile stop the run unless accepted, and are then recorded in
    ``state.link_errors``. ``reshape(name)`` shapes the running cluster's links for a later pass of ``names``."""
    world = scenario.world_size
    if names[0] == "loopback":
        yield (lambda jobs: local_torchrun(jobs, world)), None
        return
    links, access = pass_links(scenario, names[0])
    with EmulatedCluster(world, links, backend, access, scenario.own_paths(), scenario.congestion_control,
                         log=console.print) as cluster:
        env_file = results / "environment.json"
        env_file.write_text(json.dumps(json.loads(env_file.read_text()) | {
            "topology": scenario.topology, "congestion_control": cluster.congestion}, indent=1))
        if names[0] == "shaped":
            probe_links(scenario, cluster, links, console, results, state, accept_link_error)
        prefixes = [cluster.prefix(k) for k in range(world)]
        yield (lambda jobs: node_torchrun(jobs, world, prefixes, cluster.address(0), NODE_IF),
               lambda name: cluster.reshape(*pass_links(scenario, name)))


def probe_links(scenario: Scenario, cluster: EmulatedCluster, links: dict, console: Console, results: Path,
                state: RunState, accept_link_error: bool) -> None:
    probes, paths = [], scenario.probe_paths()
    with Progress(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("probing links (rate and RTT)", total=len(paths))
        for s, d in paths:
            probes.append(probe_link(cluster, s, d, links[(s, d)]))
            bar.advance(task)
    (results / "links.json").write_text(json.dumps(
        [asdict(p) | {"rate_error": p.rate_error, "misses": p.misses} for p in probes], indent=1))
    t = Table(title="link probes (measured before the run)")
    for col in ("link", "configured", "wire Mbit/s", "rate error", "RTT ms", "configured RTT ms", "check"):
        t.add_column(col, justify="left" if col == "check" else "right")
    for p in probes:
        t.add_row(f"{p.src}->{p.dst}", links[(p.src, p.dst)].describe(), f"{p.wire_mbit:.1f}",
                  "-" if p.rate_error is None else f"{p.rate_error:+.1%}", f"{p.rtt_ms:.2f}",
                  f"{p.configured_rtt_ms:.2f}", "[red]" + escape("; ".join(p.misses)) if p.misses else "ok")
    console.print(t)
    missed = [f"{p.src}->{p.dst}: {'; '.join(p.misses)}" for p in probes if p.misses]
    if missed and not accept_link_error:
        raise LinkCheckFailed(f"{len(missed)} link(s) miss their profile, so the run would not measure the "
                              f"scenario: {missed[0]}; this host cannot emulate that link (or pass "
                              f"--accept-link-error to run anyway, recorded in summary.json)")
    state.link_errors = missed


def run_passes(scenario: Scenario, passes: str | list[str], commands, results: Path, backend: str, refs: dict,
               model: DiTModel, console: Console, done: Callable[[MethodResult], None],
               reshape: Callable[[str], None] | None = None) -> None:
    """Every (pass, seed, method) of ``passes`` as jobs of one launch: the ranks are kept across methods and passes
    (one ``torchrun`` per node; between passes they wait while ``reshape`` shapes the links anew), with a progress
    bar per job. A job that fails ends its launch; it is recorded as failed and the jobs after it run in a new
    launch. ``done`` receives each job's row (status ``failed`` if it failed) as soon as the job has ended."""
    from ..runtime.quality import compare

    passes = [passes] if isinstance(passes, str) else passes
    jobs = []
    for pass_name in passes:
        ready = results / pass_name / "links.ready"
        for seed in scenario.seeds:
            for method in scenario.methods:
                run_dir = results / pass_name / method.name / f"seed{seed}"
                run_dir.mkdir(parents=True)
                first = pass_name != passes[0] and not any(j[0] == pass_name for j in jobs)
                (run_dir / "job.json").write_text(Job(
                    scenario=scenario, method=method, seed=seed, out_dir=str(run_dir.resolve()), backend=backend,
                    links_ready=str(ready.resolve()) if first else None).model_dump_json(indent=1))
                jobs.append((pass_name, method, seed, run_dir))
    finished: set[int] = set()
    lock = threading.Lock()
    reshape_error: list[BaseException] = []

    def finish(j: int) -> None:
        with lock:
            if j in finished or not (jobs[j][3] / "run.json").is_file():
                return
            finished.add(j)
            pass_name, method, seed, run_dir = jobs[j]
            row = collect(run_dir, method, seed)
            row.links = pass_name
            row.quality = compare(np.load(run_dir / "images.npy"), refs[seed][0], scenario.conditions,
                                  model.classifier)
            done(row)

    with Progress(TextColumn("{task.description:<34}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(), console=console) as progress:
        bars = [progress.add_task(f"{p}: {m.name} (seed {s})", total=scenario.steps, start=False)
                for p, m, s, _ in jobs]
        pending, launch_no = list(range(len(jobs))), 0
        while pending:
            launch, current = list(pending), [pending[0]]
            first = jobs[launch[0]][0]
            if first != passes[0] and not (results / first / "links.ready").exists():
                reshape(first)                  # a relaunch whose pass's links were never reshaped
                (results / first / "links.ready").touch()

            def on_run(i: int, n: int, launch=launch, current=current) -> None:
                if i > 1:
                    finish(launch[i - 2])
                current[0] = launch[i - 1]
                progress.start_task(bars[current[0]])

            def on_step(k: int, n: int, current=current) -> None:
                progress.update(bars[current[0]], completed=k)

            def on_links(i: int, n: int, launch=launch) -> None:
                pass_name = jobs[launch[i - 1]][0]
                try:
                    reshape(pass_name)
                    (results / pass_name / "links.ready").touch()
                except BaseException as e:      # the ranks time out waiting; the run then ends with this error
                    reshape_error.append(e)

            try:
                run_ranks(commands([jobs[j][3] / "job.json" for j in launch]), results,
                          timeout_s=scenario.timeout_s * 4 + 60, on_step=on_step, on_run=on_run,
                          on_links=on_links if reshape else None,
                          log_prefix=f"{passes[0]}/" + ("launcher" if launch_no == 0 else
                                                        f"relaunch{launch_no}-launcher"))
                error = None
            except RunFailed as e:
                error = str(e)
            if reshape_error:
                raise RunFailed(f"the links could not be reshaped for the next pass: {reshape_error[0]}")
            for j in launch:
                finish(j)
            failed = next((j for j in launch if j not in finished), None)
            if error is None or failed is None:      # a launch that failed after its last job keeps every result
                return
            pass_name, method, seed, _ = jobs[failed]
            progress.update(bars[failed], description=f"{pass_name}: {method.name} [red]failed")
            done(MethodResult(method=method.name, seed=seed, links=pass_name, status="failed", error=error))
            pending = [j for j in launch if j not in finished and j != failed]
            launch_no += 1
