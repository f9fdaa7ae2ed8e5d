"""Regression check of a measured run against a committed baseline, on figures that do not depend on how fast the
host computes.

Figures per method (one ``scenario run``, shaped links):
  bytes_on_wire, compression_ratio   exact: the codec's accounting
  psnr_db                            against the single-process reference (exact methods capped at 100)
  exchange_vs_model                  the time each rank was blocked on the exchange, less what it waited for slower
                                     ranks' compute, over the hop model's cost of the links it ran on (shipped
                                     calibration); per step the median over ranks, then the lower quartile over
                                     steps (a stall of a few seconds, when the emulation host's delay line falls
                                     behind, lengthens some steps only). Methods with a synchronous K/V all-gather
                                     (ring, patch, compact-*). Compute speed cancels: it measures the exchange
                                     against the links.
Latency, and speedup over ring, are not figures: the compressed methods are compute-bound and ring link-bound, so
both follow the host's speed (the simulator's prediction with the run's host factor still misses by 10-30% on a host
three times slower than the calibration's).
The baseline (``tests/baselines/*.json``) holds the median of repeated runs and, for the timing figures, a relative
tolerance derived from their spread: ``SPREAD_FACTOR`` x (max - min) / median, kept within ``TOLERANCE_RANGE`` so
that a 20% slower exchange always fails. It changes only through ``scenario regress --update --repeats N``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..runtime.records import read_state, read_summary
from ..scenarios.schema import Scenario
from ..simulator.costs import Calibration
from ..simulator.fit import columns, comm_seconds
from ..simulator.points import hop_points
from ..simulator.runs import congestion_in_force

EXACT = {"bytes_on_wire": {"kind": "exact"}, "compression_ratio": {"kind": "relative", "value": 1e-6},
         "psnr_db": {"kind": "absolute", "value": 1.0, "note": "dB; exact methods capped at 100"}}
TIMED = ("exchange_vs_model",)
SPREAD_FACTOR = 3.0
TOLERANCE_RANGE = (0.08, 0.15)


@dataclass
class Check:
    method: str
    figure: str
    baseline: float
    measured: float
    ok: bool
    rule: str

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return (f"{mark} {self.method:<14} {self.figure:<20} baseline {self.baseline:>12.4g}  measured "
                f"{self.measured:>12.4g}  ({self.rule})")


def exchange_vs_model(results_dir: Path, calib: Calibration, judged_on: Scenario | None = None) -> dict[str, float]:
    """Per synchronous-gather method: the measured exchange time over the hop model's
    (:func:`simulator.points.hop_points`), per step the median over ranks, then the lower quartile over steps.
    ``judged_on``: the links of this scenario instead of the run's own (what a baseline's links allow)."""
    by_method: dict[str, list[dict]] = {}
    congestion = congestion_in_force(results_dir)
    for row in hop_points([results_dir], calib, judged_on):
        if Path(row["run"]).parent.parent.name == "shaped":
            by_method.setdefault(Path(row["run"]).parent.name, []).append(row)
    out = {}
    for method, rows in by_method.items():
        col = columns(rows)
        ratio = (col["comm_wait_s"] - col["imbalance_s"]) / comm_seconds(calib.hop_params("cpu", congestion), col)
        steps: dict[int, list[float]] = {}
        for row, r in zip(rows, ratio):
            steps.setdefault(row["step"], []).append(r)
        out[method] = float(np.percentile([np.median(v) for v in steps.values()], 25))
    return out


def figures(results_dir: Path, calib: Calibration | None = None, judged_on: Scenario | None = None
            ) -> dict[str, dict[str, float]]:
    """The regression figures of every successful shaped row of a complete results folder."""
    state = read_state(results_dir)
    if not state.usable:
        raise ValueError(f"{results_dir} is not a complete, uncontaminated run: {state.describe()}")
    _, rows = read_summary(results_dir)
    exchange = exchange_vs_model(results_dir, calib or Calibration.load(), judged_on)
    out = {}
    for r in rows:
        if r.ok and r.links == "shaped":
            out[r.method] = dict(bytes_on_wire=float(r.bytes_on_wire), compression_ratio=r.compression_ratio,
                                 psnr_db=min(r.quality["psnr_db"], 100.0))
            if r.method in exchange:
                out[r.method]["exchange_vs_model"] = exchange[r.method]
    return out


def baseline_of(repeats: list[dict[str, dict[str, float]]], scenario_name: str) -> dict:
    """A baseline from the figures of repeated runs: each figure's median; each timing figure's tolerance from its
    spread (:data:`SPREAD_FACTOR`, bounded by :data:`TOLERANCE_RANGE`)."""
    methods: dict[str, dict] = {}
    tolerances: dict[str, dict] = dict(EXACT)
    for method in repeats[0]:
        values = {fig: [r[method][fig] for r in repeats if fig in r.get(method, {})] for fig in repeats[0][method]}
        methods[method] = {fig: float(np.median(v)) for fig, v in values.items()}
        for fig in TIMED:
            if fig in values:
                v = values[fig]
                spread = (max(v) - min(v)) / float(np.median(v))
                tol = min(max(SPREAD_FACTOR * spread, TOLERANCE_RANGE[0]), TOLERANCE_RANGE[1])
                tolerances[f"{method}/{fig}"] = {"kind": "relative", "value": round(tol, 4),
                                                 "note": f"{len(v)} runs: {', '.join(f'{x:.3f}' for x in v)}"}
    return {"scenario": scenario_name, "repeats": len(repeats), "tolerances": tolerances, "methods": methods}


def compare(measured: dict, baseline: dict) -> list[Check]:
    tol = baseline["tolerances"]
    checks = []
    for method, base in baseline["methods"].items():
        got = measured.get(method)
        for figure, want in base.items():
            rule = tol.get(f"{method}/{figure}", tol.get(figure, {"kind": "exact"}))
            value = None if got is None else got.get(figure)
            if value is None:
                checks.append(Check(method, figure, want, float("nan"), False, "missing from the run"))
                continue
            kind, t = rule["kind"], rule.get("value", 0)
            if kind == "exact":
                ok, text = value == want, "exact"
            elif kind == "relative":
                ok, text = abs(value - want) <= t * abs(want), f"within {t:.0%}"
            else:
                ok, text = abs(value - want) <= t, f"within +-{t}"
            checks.append(Check(method, figure, want, value, bool(ok) and not math.isnan(value), text))
    return checks


def write_baseline(path: Path, baseline: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(baseline, indent=1) + "\n")
