"""``scenario run``: every method of a scenario, launched as real ranks, recorded into a results folder.

Results folder (``<output>/<timestamp>/``), plain files with a stated schema:
  scenario.yaml          the validated scenario, as run
  environment.json       versions, CPU/GPU, link mode, codec backend
  reference/seed<k>.npy  single-process diffusers images (ground truth for quality)
  <pass>/launcher<i>.log  the launch of the passes one cluster runs (ranks kept across their methods; the first
                         pass's folder); relaunch<n>-* after a failure
  <pass>/links.ready     a later pass's links were reshaped (its ranks waited for this file)
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
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console

from ..netem.cluster import check_backend, cleanup_stale
from ..netem.lock import EmulationLock
from ..runtime import pipefusion
from ..runtime.models import DiTModel, ModelFolderError, check_conditions, check_folder, load_for
from ..runtime.records import MethodResult, RunState
from ..scenarios.schema import Scenario
from .passes import launch_groups, link_passes, run_passes
from .report import add_speedups, print_table, write_plots, write_summary


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


def timed_references(model: DiTModel, scenario: Scenario) -> Iterator[tuple[int, tuple[np.ndarray, float]]]:
    """(seed, (images, seconds)) of every seed's single-process reference, after an untimed one-step generation: the
    process's first call pays one-off costs (allocations, first dispatch) that a host-speed probe must not. The
    host's pace is measured this way by a run and by ``scenario predict --probe-host`` alike."""
    reference_images(model, scenario.model_copy(update={"steps": 1}), scenario.seeds[0])
    for seed in scenario.seeds:
        yield seed, reference_images(model, scenario, seed)


def references(model: DiTModel, scenario: Scenario, results: Path, console: Console, meta: dict) -> dict:
    """Every seed's single-process reference (``reference/seed<k>.npy``, :func:`timed_references`), its time
    recorded in ``meta``."""
    refs = {}
    for seed, ref in timed_references(model, scenario):
        refs[seed] = ref
        (results / "reference").mkdir(exist_ok=True)
        np.save(results / "reference" / f"seed{seed}.npy", refs[seed][0])
        console.print(f"single-process reference (seed {seed}): {refs[seed][1]:.2f} s")
    meta |= dict(reference_latency_s={s: r[1] for s, r in refs.items()}, reference_threads=REFERENCE_THREADS,
                 reference_warmup_steps=1)
    return refs


def host_probe(model: DiTModel, scenario: Scenario, console: Console, meta: dict) -> None:
    """The host's compute and exchanges with every rank on it (:mod:`.hostprobe`), recorded in ``meta`` as
    ``corun``; a probe that fails is reported and recorded as missing."""
    from ..simulator.points import corun_factor, exchange_floor
    from .hostprobe import corun_probe

    try:
        probe = corun_probe(model, scenario)
    except Exception as e:              # the run goes on: the probe only informs the simulator's validation
        console.print(f"[yellow]host probe failed:[/] {type(e).__name__}: {e}")
        meta["corun"] = None
        return
    factor, floor = corun_factor(probe), exchange_floor(probe)
    console.print(f"host probe: one forward on a rank's share {probe['alone_s'] * 1e3:.1f} ms alone, "
                  f"{factor:.2f}x that with {probe['ranks']} ranks at once"
                  + (f"; an exchange beside them adds {floor * 1e3:.2f} ms over loopback" if floor is not None else ""))
    if probe.get("exchange_error"):
        console.print(f"[yellow]host probe: the exchange part failed:[/] {probe['exchange_error']}")
    meta["corun"] = probe


def row_recorder(rows: list, state: RunState, save: Callable[[], None]) -> Callable[[MethodResult], None]:
    """What a launch calls with each job's row: kept, marked done, and the summary rewritten."""
    def done(row: MethodResult) -> None:
        rows.append(row)
        state.methods_done.append(f"{row.links}/{row.method}/seed{row.seed}")
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
            if scenario.world_size > 1:
                host_probe(model, scenario, console, meta)
            for group in launch_groups(scenario, passes):
                with link_passes(scenario, group, check.backend if emulate else None, console, results, state,
                                 accept_link_error) as (commands, reshape):
                    run_passes(scenario, group, commands, results, backend, refs, model, console,
                               row_recorder(rows, state, save), reshape)
    write_plots(results, rows)
    print_table(rows, console, f"{scenario.name}: {link_mode}")
    if state.contaminated:
        console.print(f"[yellow]timings contaminated:[/] {state.contaminated}")
    console.print(f"results: {results} ({state.describe()})")
    return results, rows
