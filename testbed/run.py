"""``scenario run``: every method of a scenario, launched as real ranks, recorded into a results folder.

Results folder (``<output>/<timestamp>/``), plain files with a stated schema:
  scenario.yaml          the validated scenario, as run
  environment.json       versions, CPU/GPU, link mode, codec backend
  reference/seed<k>.npy  single-process diffusers images (ground truth for quality)
  <pass>/launcher<i>.log  one launch per link pass (ranks kept across its methods); relaunch<n>-* after a failure
  <pass>/<method>/seed<k>/  job.json, rank<r>.jsonl and run.json (typed in runtime.records),
                         images.npy; rank<r>.error when a rank failed
  summary.json / .csv    the folder's state (running, complete, interrupted, failed) and one row per
                         (pass, method, seed): latency, speedups, bytes, ratio, quality, status
  plots.html             latency, time breakdown and bytes per method (plotly)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..netem.cluster import EmulatedCluster, check_backend, cleanup_stale
from ..netem.commands import NODE_IF
from ..netem.lock import EmulationLock
from ..netem.probe import probe_link
from ..runtime import pipefusion
from ..runtime.engine import Job
from ..runtime.models import DiTModel, ModelFolderError, check_conditions, check_folder, load_for
from ..runtime.records import MethodResult, RunState
from ..scenarios.schema import Scenario
from .launch import RunFailed, local_torchrun, node_torchrun, run_ranks
from .report import add_speedups, collect, print_table, write_plots, write_summary


class LinkCheckFailed(RunFailed):
    """A shaped link missed its profile; the run did not start its methods."""


def environment(link_mode: str) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return dict(python=platform.python_version(), platform=platform.platform(), cpu=platform.processor(),
                cpus=os.cpu_count(), gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                link_mode=link_mode, packages={p: version(p) for p in (
                    "torch", "xfuser", "diffusers", "numba", "triton", "compactbed", "simpy", "dash")},
                started=datetime.datetime.now().isoformat(timespec="seconds"))


def checked_model(scenario: Scenario) -> DiTModel:
    """Load the scenario's model and check that its conditions and every method's split fit it."""
    model = load_for(scenario.model, frames=scenario.frames)
    check_conditions(model, scenario.conditions)
    for m in scenario.methods:
        u, r = scenario.degrees(m)
        try:
            model.check_layout(scenario.resolution, u * r, u)
            if m.pipelined:
                pipefusion.check(model, scenario.guidance)
            if scenario.cfg_degree(m) > 1 and model.cfg_scale(scenario.guidance) == 1.0:
                raise ModelFolderError("CFG parallel needs a classifier-free-guidance batch, and this model runs one "
                                       "pass per step (guidance-distilled)")
        except ModelFolderError as e:
            raise ModelFolderError(f"method {m.name}: {e}") from None
    return model


REFERENCE_THREADS = 1     # like every rank (OMP_NUM_THREADS=1): the reference's time is the host's speed probe


def reference_images(model: DiTModel, scenario: Scenario, seed: int) -> tuple[np.ndarray, float]:
    """Single-process diffusers sampling with the same seed, and its wall time on REFERENCE_THREADS threads (the
    simulator compares it across runs to follow the host's speed)."""
    from ..runtime.sampling import sample_reference

    threads = torch.get_num_threads()
    torch.set_num_threads(REFERENCE_THREADS)
    try:
        t0 = time.perf_counter()
        images = sample_reference(model, scenario.conditions, scenario.resolution, scenario.steps, seed,
                                  scenario.guidance).numpy()
        return images, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


def new_results(scenario: Scenario, output: Path, link_mode: str) -> Path:
    """A fresh results folder holding the scenario as run and this machine's environment."""
    results = output / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results.mkdir(parents=True, exist_ok=False)
    (results / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False))
    (results / "environment.json").write_text(json.dumps(environment(link_mode), indent=1))
    return results


def references(model: DiTModel, scenario: Scenario, results: Path, console: Console, meta: dict) -> dict:
    """Every seed's single-process reference (``reference/seed<k>.npy``), its time recorded in ``meta``."""
    refs = {}
    for seed in scenario.seeds:
        refs[seed] = reference_images(model, scenario, seed)
        (results / "reference").mkdir(exist_ok=True)
        np.save(results / "reference" / f"seed{seed}.npy", refs[seed][0])
        console.print(f"single-process reference (seed {seed}): {refs[seed][1]:.2f} s")
    meta |= dict(reference_latency_s={s: r[1] for s, r in refs.items()}, reference_threads=REFERENCE_THREADS)
    return refs


def row_recorder(rows: list, state: RunState, pass_name: str, save: Callable[[], None]
                 ) -> Callable[[MethodResult], None]:
    """What a pass calls with each job's row: kept, marked done, and the summary rewritten."""
    def done(row: MethodResult) -> None:
        rows.append(row)
        state.methods_done.append(f"{pass_name}/{row.method}/seed{row.seed}")
        save()
    return done


@contextlib.contextmanager
def recorded(state: RunState, save: Callable[[], None]) -> Iterator[None]:
    """The run's final state (complete, interrupted or failed, with why) written to its summary, whatever ends it."""
    try:
        yield
        state.state = "complete"
    except KeyboardInterrupt:
        state.state, state.reason = "interrupted", "stopped by Ctrl-C or SIGTERM"
        raise
    except BaseException as e:
        state.state, state.reason = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        save()


@contextlib.contextmanager
def link_pass(scenario: Scenario, name: str, backend, console: Console, results: Path, state: RunState,
              accept_link_error: bool = False) -> Iterator:
    """Yield a function job files -> rank commands for this pass, with its cluster up (if any). The shaped pass
    first probes the paths that check every shaped link (``Scenario.probe_paths``; ``links.json``); links that
    miss their profile stop the run unless accepted, and are then recorded in ``state.link_errors``."""
    world = scenario.world_size
    if name == "loopback":
        yield lambda jobs: local_torchrun(jobs, world)
        return
    bound, ideal = name == "bound", name == "ideal"
    links = scenario.directed_links(unlimited_rate=bound, ideal=ideal)
    with EmulatedCluster(world, links, backend, scenario.access_links(unlimited_rate=bound, ideal=ideal),
                         scenario.own_paths(), scenario.congestion_control, log=console.print) as cluster:
        env_file = results / "environment.json"
        env_file.write_text(json.dumps(json.loads(env_file.read_text()) | {
            "topology": scenario.topology, "congestion_control": cluster.congestion}, indent=1))
        if name == "shaped":
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
        prefixes = [cluster.prefix(k) for k in range(world)]
        yield lambda jobs: node_torchrun(jobs, world, prefixes, cluster.address(0), NODE_IF)


def run_scenario(scenario: Scenario, output: Path, console: Console, backend: str = "auto", shaping: bool = True,
                 bound: bool = True, force: bool = False, accept_link_error: bool = False, ideal: bool = True
                 ) -> tuple[Path, list[MethodResult]]:
    """Run every (link pass, seed, method); failed method runs are recorded and the remaining ones still run.
    Emulations hold the host's lock (``force``: run beside another, marked contaminated) and first remove what
    killed runs left. The results folder's state is written with its summary after every method run."""
    if scenario.model.path is not None:
        check_folder(scenario.model, scenario.conditions)       # before anything is created
    check = check_backend() if shaping else None
    if check is not None and check.backend is None:
        console.print(f"[yellow]link emulation unavailable:[/] {check.reason}. Running unshaped on loopback: "
                      f"latencies do not reflect the scenario's links.")
    emulate = check is not None and check.backend is not None
    passes = ["shaped", *(["bound"] if bound else []), *(["ideal"] if ideal else [])] if emulate else ["loopback"]
    link_mode = f"emulated ({check.backend}: {check.reason})" if emulate else "loopback (unshaped)"
    lock = EmulationLock(f"scenario {scenario.name} -> {output}", force) if emulate else contextlib.nullcontext()
    with lock:
        if emulate:
            removed = cleanup_stale()
            if removed:
                console.print(f"removed what killed runs left: {', '.join(removed)}")
        results = new_results(scenario, output, link_mode)
        console.print(f"[bold]{scenario.name}[/]: {scenario.world_size} ranks, {len(scenario.methods)} methods, "
                      f"{scenario.steps} steps; links: {link_mode}; passes: {', '.join(passes)} -> {results}")
        state, rows = RunState(), []
        meta = dict(scenario=scenario.name, link_mode=link_mode, passes=passes)

        def save() -> None:
            if emulate:
                lock.others()
                state.contaminated = lock.contaminated
            add_speedups(rows)
            write_summary(results, rows, meta, state)

        save()
        with recorded(state, save):
            model = checked_model(scenario)
            refs = references(model, scenario, results, console, meta)
            for pass_name in passes:
                with link_pass(scenario, pass_name, check.backend if emulate else None, console, results, state,
                               accept_link_error) as commands:
                    _pass_runs(scenario, pass_name, commands, results, backend, refs, model, console,
                               row_recorder(rows, state, pass_name, save))
    write_plots(results, rows)
    print_table(rows, console, f"{scenario.name}: {link_mode}")
    if state.contaminated:
        console.print(f"[yellow]timings contaminated:[/] {state.contaminated}")
    console.print(f"results: {results} ({state.describe()})")
    return results, rows


def _pass_runs(scenario: Scenario, pass_name: str, commands, results: Path, backend: str, refs: dict,
               model: DiTModel, console: Console, done: Callable[[MethodResult], None]) -> None:
    """Every (seed, method) of one link pass as jobs of one launch: the ranks are kept across methods (one
    ``torchrun`` per node for the pass), with a progress bar per job. A job that fails ends its launch; it is
    recorded as failed and the jobs after it run in a new launch. ``done`` receives each job's row (status
    ``failed`` if it failed) as soon as the job has ended."""
    from ..runtime.quality import compare

    jobs = []
    for seed in scenario.seeds:
        for method in scenario.methods:
            run_dir = results / pass_name / method.name / f"seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "job.json").write_text(Job(scenario=scenario, method=method, seed=seed,
                                                  out_dir=str(run_dir.resolve()), backend=backend).model_dump_json(indent=1))
            jobs.append((method, seed, run_dir))
    finished: set[int] = set()
    lock = threading.Lock()

    def finish(j: int) -> None:
        with lock:
            if j in finished or not (jobs[j][2] / "run.json").is_file():
                return
            finished.add(j)
            method, seed, run_dir = jobs[j]
            row = collect(run_dir, method, seed)
            row.links = pass_name
            row.quality = compare(np.load(run_dir / "images.npy"), refs[seed][0], scenario.conditions,
                                  model.classifier)
            done(row)

    with Progress(TextColumn("{task.description:<34}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} steps"), TimeElapsedColumn(), console=console) as progress:
        bars = [progress.add_task(f"{pass_name}: {m.name} (seed {s})", total=scenario.steps, start=False)
                for m, s, _ in jobs]
        pending, launch_no = list(range(len(jobs))), 0
        while pending:
            launch, current = list(pending), [pending[0]]

            def on_run(i: int, n: int, launch=launch, current=current) -> None:
                if i > 1:
                    finish(launch[i - 2])
                current[0] = launch[i - 1]
                progress.start_task(bars[current[0]])

            def on_step(k: int, n: int, current=current) -> None:
                progress.update(bars[current[0]], completed=k)

            try:
                run_ranks(commands([jobs[j][2] / "job.json" for j in launch]), results / pass_name,
                          timeout_s=scenario.timeout_s * 4 + 60, on_step=on_step, on_run=on_run,
                          log_prefix="launcher" if launch_no == 0 else f"relaunch{launch_no}-launcher")
                error = None
            except RunFailed as e:
                error = str(e)
            for j in launch:
                finish(j)
            failed = next((j for j in launch if j not in finished), None)
            if error is None or failed is None:      # a launch that failed after its last job keeps every result
                return
            method, seed, _ = jobs[failed]
            progress.update(bars[failed], description=f"{pass_name}: {method.name} [red]failed")
            done(MethodResult(method=method.name, seed=seed, links=pass_name, status="failed", error=error))
            pending = [j for j in launch if j not in finished and j != failed]
            launch_no += 1
