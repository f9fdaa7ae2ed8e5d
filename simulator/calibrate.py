"""``scenario calibrate``: fit a calibration from results folders (and link micro-benchmark or earlier calibration
folders) and write it, with the points and runs it was fitted on, as plain files.

  calibration.json  the fitted constants (:class:`.costs.Calibration`)
  compute.csv codec.csv links.csv hops.csv local_steps.csv   the measured points (:mod:`.points`)
  runs.json         the measured runs (:mod:`.runs`), so the calibration can be refitted or cross-validated alone
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..runtime.records import read_state
from .costs import HOP_PARAMS, Calibration
from .fit import (
    ASYNC_PARAMS,
    columns,
    comm_seconds,
    fit_codec,
    fit_codec_call,
    fit_compute_on_host,
    fit_hops,
    fit_kept_local_step,
    fit_local_step,
    identified,
    refine_hops_on_runs,
    refine_rtt_factor_on_runs,
)
from .points import (
    codec_points,
    compute_points,
    earlier_points,
    hop_points,
    host_factors,
    kept_local_steps,
    link_points,
    linkbench_points,
    read_csv,
    results_folder,
    write_csv,
)
from .runs import is_calibration, read_runs, results_folders, write_runs


LOCAL_STEPS = "local_steps.csv"     # the local warmup steps of kept processes (points.kept_local_steps)


def _sources(results: list[Path], exclude: set[str] = frozenset()) -> list[str]:
    out = []
    for r in results:
        earlier = Path(r) / "calibration.json"
        out += json.loads(earlier.read_text()).get("sources", []) if earlier.is_file() else [str(r)]
    return [s for s in dict.fromkeys(out) if s not in exclude]


def _inputs(results: list[Path], exclude: set[str]) -> list[Path]:
    """The calibration's inputs one by one: earlier calibration folders as given, every complete, uncontaminated
    results folder under the other paths, except those in ``exclude``; paths without any results folder (link
    micro-benchmark folders) as given."""
    out = []
    for root in map(Path, results):
        found = [] if is_calibration(root) else results_folders(root)
        out += [f for f in found if str(f) not in exclude and _fits(read_state(f))] if found else [root]
    return out


def _fits(state) -> bool:
    """A results folder the calibration may fit on: complete, uncontaminated, every link on its profile."""
    return state.usable and not state.link_errors


def _earlier_calibration(results: list[Path]) -> Calibration | None:
    """The first earlier calibration among ``results``."""
    return next((Calibration.load(Path(r)) for r in results if is_calibration(r)), None)


def calibrate(results: list[Path], out: Path, cores: int | None = None, log=print,
              codec_rows: list[dict] | None = None, exclude: set[str] = frozenset()) -> Calibration:
    """Fit a calibration from results folders (and earlier calibration folders) and write it, with its data points
    and measured runs, to ``out``. ``codec_rows``: codec timings to use (codec.csv rows) instead of an earlier
    calibration's among ``results`` or, without one, measuring the kernels now. ``exclude``: results folders of
    earlier calibrations to leave out (rows and runs)."""
    cores = cores or os.cpu_count() or 1
    exclude = set(map(str, exclude))
    for root in map(Path, results):
        for folder in [] if is_calibration(root) else results_folders(root):
            if not _fits(state := read_state(folder)):
                log(f"left out {folder}: {state.describe()}")
    results = _inputs(results, exclude)
    runs = read_runs(results, exclude)
    cpoints = compute_points(results, cores)
    cpoints += earlier_points(results, "compute.csv", cpoints, exclude)
    if not cpoints:
        raise ValueError("no measured runs (run.json + rank*.jsonl) under " + ", ".join(map(str, results)))
    earlier = _earlier_calibration(results)
    earlier_cpu = earlier.devices.get("cpu") if earlier else None
    device, on_host = fit_compute_on_host(cpoints, cores, earlier_cpu.reference_pace if earlier_cpu else None, runs)
    cpoints = [p | {"host_factor": q["host_factor"]} for p, q in zip(cpoints, on_host)]
    # per-step time outside the layers (embeddings, final layer, sampler update), from the same records
    step_rows = {}
    for p in on_host:
        step_rows.setdefault((p["run"], p["rank"], p["step"]), []).append(p)
    residual = [max(0.0, ps[0]["wall_s"] - sum(q["seconds"] for q in ps) - ps[0]["comm_wait_s"] - ps[0]["codec_s"])
                for ps in step_rows.values()]
    device.step_overhead_s = float(np.median(residual))
    device.local_step_factor = fit_local_step(on_host, device)
    lsteps = kept_local_steps(cpoints)
    lsteps += earlier_points(results, LOCAL_STEPS, lsteps, exclude)
    device.kept_local_step_factor = fit_kept_local_step(lsteps, device)
    shapes = sorted({(p["tokens"], p["hidden"]) for p in cpoints})
    earlier_codec = [row for r in results if is_calibration(r) and (Path(r) / "codec.csv").is_file()
                     for row in read_csv(Path(r) / "codec.csv")]
    kpoints = codec_rows if codec_rows is not None else earlier_codec or \
        codec_points([(max(8, t), h) for t, h in shapes[:: max(1, len(shapes) // 6)]])
    lpoints = link_points(results)
    lpoints += earlier_points(results, "links.csv", lpoints, exclude)
    shaped = [p for p in lpoints if p["configured_rate_mbit"]]
    efficiency = float(np.mean([p["wire_mbit"] / p["configured_rate_mbit"] for p in shaped])) if shaped else 1.0
    overhead = float(np.mean([(p["rtt_ms"] - p["configured_rtt_ms"]) / 2 / 1e3 for p in lpoints])) if lpoints else 0.0
    calib = Calibration(devices={"cpu": device}, codec=fit_codec(kpoints), link_efficiency=efficiency,
                        link_overhead_s=max(0.0, overhead), sources=_sources(results, exclude))
    if earlier:     # whole runs of DistriFusion refit it below; without any, an earlier calibration's value stays
        for name in ASYNC_PARAMS:
            setattr(calib, name, getattr(earlier, name))
        calib.async_sources = list(earlier.async_sources)
        # other TCP algorithms' round trips, measured by the link micro-benchmark (testbed.linkbench --into)
        calib.congestion_control = earlier.congestion_control
        calib.rtt_factor_by_algorithm = dict(earlier.rtt_factor_by_algorithm)
        calib.rtt_sources = dict(earlier.rtt_sources)
    device.codec_call_s = fit_codec_call(cpoints, calib)
    hpoints = hop_points(results, calib)
    hpoints += earlier_points(results, "hops.csv", hpoints, exclude)
    bench = linkbench_points(results, calib)
    # Whole runs when there are any: on an emulation host their communication also pays for CPU contention
    # (ranks and the delay line share the cores), which links measured alone (micro-benchmarks) do not show.
    if hpoints or bench:
        for name, value in zip(HOP_PARAMS, fit_hops(hpoints or bench)):
            setattr(calib, name, value)
    if hpoints:
        fitted = refine_hops_on_runs(runs, calib, identified(hpoints))
        if fitted:
            log(f"hop model refined on {fitted} whole runs (their latency, median over seeds)")
        if fitted and distrifusion_runs(runs):      # the async factor too, on this calibration's own runs
            calib.async_sources = []
    if hpoints and bench:
        col = columns(hpoints)
        ratio = np.median((col["comm_wait_s"] - col["imbalance_s"]) / np.maximum(comm_seconds(fit_hops(bench), col), 1e-9))
        log(f"the runs' time blocked on communication is {ratio:.2f}x (median) what the links alone cost "
            f"(fitted on {len(bench)} micro-benchmark points); the hop model is fitted on the runs")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "hops.csv", hpoints)
    write_csv(out / "compute.csv", cpoints)
    write_csv(out / LOCAL_STEPS, lsteps)
    write_csv(out / "codec.csv", kpoints)
    write_csv(out / "links.csv", lpoints)
    write_runs(out, runs)
    calib.save(out)
    log(f"calibrated from {len(cpoints)} layer timings, {len(kpoints)} codec timings, {len(lpoints)} link probes, "
        f"hops fitted on {f'{len(hpoints)} run steps' if hpoints else f'{len(bench)} micro-benchmark points'} -> {out}")
    return calib


def local_step_into(results: list[Path], into: Path, cores: int | None = None, log=print) -> tuple | None:
    """Fit only the local warmup step of processes kept across jobs (:func:`.fit.fit_kept_local_step`) on the
    results folders under ``results`` and the local steps already stored in the calibration folder ``into``, and
    write it there (``calibration.json`` and its points in ``local_steps.csv``); every other constant stays. The
    runs' host factors are taken against ``into``'s compute model."""
    if not is_calibration(into):
        raise ValueError(f"{into} is not a calibration folder (no calibration.json)")
    calib = Calibration.load(into)
    device = calib.devices["cpu"]
    folders = _inputs(results, set())
    factors = host_factors(read_runs(folders), device)
    points = [p | {"host_factor": factors.get(results_folder(p["run"]), 1.0)}
              for p in compute_points(folders, cores or device.cores or os.cpu_count() or 1)]
    rows = kept_local_steps(points)
    rows += earlier_points([into], LOCAL_STEPS, rows)
    if not rows:
        raise ValueError("no local warmup step of a job after the first in its launch under " +
                         ", ".join(map(str, results)))
    device.kept_local_step_factor = fit_kept_local_step(rows, device)
    write_csv(into / LOCAL_STEPS, rows)
    calib.save(into)
    f0, f1 = device.kept_local_step_factor
    log(f"local warmup step in kept processes: {f0:.3f} + {f1:.3f} x (share - 1) x the modelled compute, "
        f"from {len(rows)} runs -> {into}")
    return device.kept_local_step_factor


def async_into(results: list[Path], into: Path, log=print) -> float:
    """Fit only DistriFusion's ``async_transfer_factor`` (:func:`.fit.refine_hops_on_runs` with every hop constant
    held) on the runs under ``results`` and those stored in the calibration folder ``into`` (runs of DistriFusion's
    earlier refresh left out), and write it there with the folders it came from (``async_sources``); every other
    constant, and the stored runs, stay."""
    if not is_calibration(into):
        raise ValueError(f"{into} is not a calibration folder (no calibration.json)")
    calib = Calibration.load(into)
    fitted = distrifusion_runs(read_runs([into, *results]))
    if not fitted:
        raise ValueError("no DistriFusion run that refreshed every step under " + ", ".join(map(str, [into, *results])))
    refine_hops_on_runs(fitted, calib, [False] * len(HOP_PARAMS))
    calib.async_sources = [r.folder for r in fitted]
    calib.save(into)
    log(f"asynchronous gathers: transfers {calib.async_transfer_factor:.3f} x a synchronous gather's, from "
        f"{len(fitted)} runs -> {into}")
    return calib.async_transfer_factor


def rtt_into(results: list[Path], into: Path, log=print) -> dict[str, float]:
    """Fit only the round trips per hop of each TCP algorithm other than the calibration's own
    (``rtt_factor_by_algorithm``, :func:`.fit.refine_rtt_factor_on_runs`) on the whole runs under ``results`` made
    under it, and write them into the calibration folder ``into`` with the folders they came from
    (``rtt_sources``); every other constant, and the stored runs, stay. Whole runs carry what a link
    micro-benchmark does not: the ranks' CPU contention and their links' topology and connection reuse."""
    if not is_calibration(into):
        raise ValueError(f"{into} is not a calibration folder (no calibration.json)")
    calib = Calibration.load(into)
    by_algorithm: dict[str, list] = {}
    for run in read_runs(_inputs(results, set())):
        if run.congestion_control not in ("host", calib.congestion_control):
            by_algorithm.setdefault(run.congestion_control, []).append(run)
    if not by_algorithm:
        raise ValueError(f"no run under a TCP algorithm other than the calibration's ({calib.congestion_control}) "
                         "under " + ", ".join(map(str, results)))
    for algorithm, runs in sorted(by_algorithm.items()):
        before = calib.rtt_factor(algorithm)
        cases = refine_rtt_factor_on_runs(runs, calib, algorithm)
        calib.rtt_sources[algorithm] = [r.folder for r in runs]
        log(f"{algorithm}: round trips per hop {calib.rtt_factor(algorithm):.3f} x the calibration's "
            f"({calib.congestion_control}; was {before:.3f}), from {cases} cases of {len(runs)} runs")
    calib.save(into)
    return dict(calib.rtt_factor_by_algorithm)


def distrifusion_runs(runs: list) -> list:
    """The runs with a DistriFusion method that refreshed every step (those the simulator models)."""
    return [r for r in runs if not r.distrifusion_alternated and
            any(m.get("comm") == "distrifusion" for m in r.scenario.get("methods", []))]
