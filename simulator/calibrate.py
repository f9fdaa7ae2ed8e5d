"""``scenario calibrate``: fit a calibration from results folders (and link micro-benchmark or earlier calibration
folders) and write it, with the points and runs it was fitted on, as plain files.

  calibration.json  the fitted constants (:class:`.costs.Calibration`)
  compute.csv codec.csv links.csv hops.csv   the measured points (:mod:`.points`)
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
    fit_local_step,
    identified,
    refine_hops_on_runs,
)
from .points import codec_points, compute_points, earlier_points, hop_points, link_points, linkbench_points, write_csv
from .runs import is_calibration, read_runs, results_folders, write_runs


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
    and measured runs, to ``out``. ``codec_rows``: codec timings to use (codec.csv rows) instead of measuring the
    kernels now. ``exclude``: results folders of earlier calibrations to leave out (rows and runs)."""
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
    shapes = sorted({(p["tokens"], p["hidden"]) for p in cpoints})
    kpoints = codec_rows if codec_rows is not None else \
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
    if hpoints and bench:
        col = columns(hpoints)
        ratio = np.median((col["comm_wait_s"] - col["imbalance_s"]) / np.maximum(comm_seconds(fit_hops(bench), col), 1e-9))
        log(f"the runs' time blocked on communication is {ratio:.2f}x (median) what the links alone cost "
            f"(fitted on {len(bench)} micro-benchmark points); the hop model is fitted on the runs")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "hops.csv", hpoints)
    write_csv(out / "compute.csv", cpoints)
    write_csv(out / "codec.csv", kpoints)
    write_csv(out / "links.csv", lpoints)
    write_runs(out, runs)
    calib.save(out)
    log(f"calibrated from {len(cpoints)} layer timings, {len(kpoints)} codec timings, {len(lpoints)} link probes, "
        f"hops fitted on {f'{len(hpoints)} run steps' if hpoints else f'{len(bench)} micro-benchmark points'} -> {out}")
    return calib
