"""Regression check of a measured run against a committed baseline file, with stated tolerances.

Figures per method (from one ``scenario run``): bytes on the wire (exact), compression ratio (exact), speedup
over uncompressed ring within the same run, PSNR against the single-process reference, and the simulator's
error on that run. The baseline is JSON: ``{"tolerances": {...}, "methods": {name: {figure: value}}}``; it
changes only through ``scenario regress --update``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..runtime.records import read_summary

DEFAULT_TOLERANCES = {
    "bytes_on_wire": {"kind": "exact"},
    "compression_ratio": {"kind": "relative", "value": 1e-6},
    "speedup_vs_uncompressed": {"kind": "relative", "value": 0.35,
                                "note": "timing on a shared 2-core machine varies from run to run and from "
                                        "machine to machine; losing compression drops it by ~65%"},
    "psnr_db": {"kind": "absolute", "value": 1.0, "note": "dB; exact methods capped at 100"},
    "simulator_abs_error": {"kind": "at_most", "value": 0.5,
                            "note": "|predicted / measured - 1|; guards against gross regressions only"},
}


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
        return f"{mark} {self.method:<14} {self.figure:<24} baseline {self.baseline:>14.4g}  measured {self.measured:>14.4g}  ({self.rule})"


def figures(results_dir: Path, calib=None) -> dict[str, dict[str, float]]:
    """The regression figures of every successful shaped (or loopback) row of a results folder."""
    from ..simulator.costs import Calibration
    from ..simulator.predict import validate

    _, rows = read_summary(results_dir)
    rows = [r for r in rows if r.ok and r.links in ("shaped", "loopback")]
    errors = {c.method: c.error for c in validate([results_dir], calib or Calibration.load()) if c.links == "shaped"}
    out = {}
    for r in rows:
        out[r.method] = dict(bytes_on_wire=float(r.bytes_on_wire), compression_ratio=r.compression_ratio,
                             speedup_vs_uncompressed=r.speedup_vs_uncompressed,
                             psnr_db=min(r.quality["psnr_db"], 100.0))
        if r.method in errors:
            out[r.method]["simulator_abs_error"] = abs(errors[r.method])
    return out


def compare(measured: dict, baseline: dict) -> list[Check]:
    tol = baseline.get("tolerances", DEFAULT_TOLERANCES)
    checks = []
    for method, base in baseline["methods"].items():
        got = measured.get(method)
        for figure, want in base.items():
            rule = tol.get(figure, {"kind": "exact"})
            value = None if got is None else got.get(figure)
            if value is None:
                checks.append(Check(method, figure, want, float("nan"), False, "missing from the run"))
                continue
            kind, t = rule["kind"], rule.get("value", 0)
            if kind == "exact":
                ok, text = value == want, "exact"
            elif kind == "relative":
                ok, text = abs(value - want) <= t * abs(want), f"within {t:.0%}"
            elif kind == "absolute":
                ok, text = abs(value - want) <= t, f"within +-{t}"
            else:
                ok, text = value <= t, f"at most {t}"
            checks.append(Check(method, figure, want, value, bool(ok) and not math.isnan(value), text))
    return checks


def write_baseline(path: Path, measured: dict, scenario_name: str) -> None:
    data = {"scenario": scenario_name, "tolerances": DEFAULT_TOLERANCES,
            "methods": {m: {k: v for k, v in figs.items() if k != "simulator_abs_error"}
                        | ({"simulator_abs_error": DEFAULT_TOLERANCES["simulator_abs_error"]["value"]}
                           if "simulator_abs_error" in figs else {})
                        for m, figs in measured.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
