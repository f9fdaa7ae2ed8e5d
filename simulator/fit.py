"""Fitters: the calibration's constants from measured points (:mod:`.points`), by non-negative or bounded least
squares (scikit-learn, scipy). Compute per layer, the local warmup step, the codec (kernels and the fixed cost per
call in a run), and the hop model, per step and then on whole runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .costs import HOP_PARAMS, Calibration, DeviceProfile, hop_seconds
from .model import Simulator
from .points import (
    HOP_COLUMNS,
    host_factors,
    in_kept_processes,
    is_local,
    layer_pace,
    reference_pace,
    results_folder,
)
from .predict import measured_cases
from .runs import MeasuredRun


def fit_compute(points: list[dict], cores: int) -> DeviceProfile:
    """Per-layer compute of the synchronous steps: each layer's slowest rank (:func:`layer_pace`), averaged per
    (run, shape), fitted by non-negative least squares of the relative error (sklearn, weights 1/y^2) so that
    small and large shapes count alike. Local warmup steps (cold first steps, every rank busy) are left to
    :func:`fit_local_step`; without synchronous steps they are fitted instead."""
    from sklearn.linear_model import LinearRegression

    shape = {(p["run"], p["step"], p["layer"]): (p["run"], p["tokens"], p["kv_tokens"], p["hidden"], p["share"])
             for p in points}
    pace = layer_pace(points)
    timings = pace.items() if pace else [((p["run"], p["step"], p["layer"]), p["seconds"]) for p in points]
    groups: dict[tuple, list[float]] = {}
    for key, s in timings:
        groups.setdefault(shape[key], []).append(s)
    x = np.array([[share, share * t * h ** 2, share * t * kv * h] for _, t, kv, h, share in groups])
    y = np.array([np.mean(v) for v in groups.values()])
    m = LinearRegression(positive=True, fit_intercept=False).fit(x, y, sample_weight=1 / y ** 2)
    a, b, c = (float(v) for v in m.coef_)
    return DeviceProfile(a=a, b=b, c=c, cores=cores)


def fit_local_step(points: list[dict], device: DeviceProfile) -> tuple[float, float]:
    """(f0, f1) of the local warmup step in fresh processes (the first job of a launch; every job before ranks were
    kept across jobs): slowest rank's step time / modeled compute = f0 + f1 * (share - 1), by non-negative least
    squares over the measured local steps (rows with tokens == kv_tokens, world > 1) of such runs."""
    from sklearn.linear_model import LinearRegression

    steps: dict[tuple, dict] = {}
    for p in points:
        if is_local(p) and not in_kept_processes(p):
            s = steps.setdefault((p["run"], p["step"]), {"share": p["share"], "walls": {}, "modeled": {}})
            s["walls"][p["rank"]] = p["wall_s"]
            s["modeled"][p["rank"]] = s["modeled"].get(p["rank"], 0.0) + device.layer_seconds(
                p["tokens"], p["kv_tokens"], p["hidden"], p["share"])
    if not steps:
        return (1.0, 0.0)
    x = np.array([[1.0, s["share"] - 1] for s in steps.values()])
    y = np.array([max(s["walls"].values()) / max(s["modeled"].values()) for s in steps.values()])
    m = LinearRegression(positive=True, fit_intercept=False).fit(x, y)
    return float(m.coef_[0]), float(m.coef_[1])


def fit_kept_local_step(rows: list[dict], device: DeviceProfile) -> tuple[float, float] | None:
    """(f0, f1) of the local warmup step in processes kept from an earlier job of their launch, from
    :func:`.points.kept_local_steps` rows. There the step itself is short, but the ranks leave it staggered and the
    next step's exchange waits for the last, so the factor prices what the step adds to the run: (its slowest rank's
    wall + the next step's - the median later step) / host factor / modeled compute = f0 + f1 * (share - 1), by
    median regression (single steps on lossy links vary widely). None without rows."""
    from sklearn.linear_model import QuantileRegressor

    if not rows:
        return None
    x = [[1.0, r["share"] - 1] for r in rows]
    y = [(r["first_s"] + r["next_s"] - r["later_s"]) / r["host_factor"] / (r["layers"] * device.layer_seconds(
        r["tokens"], r["tokens"], r["hidden"], r["share"])) for r in rows]
    if len({s for _, s in x}) == 1:
        return float(np.median(y)), 0.0
    f0, f1 = QuantileRegressor(quantile=0.5, alpha=0.0, fit_intercept=False, solver="highs").fit(x, y).coef_
    return (float(np.median(y)), 0.0) if f0 < 0 or f1 < 0 else (float(f0), float(f1))


def fit_compute_on_host(points: list[dict], cores: int, earlier_pace: float | None = None,
                        runs: list[MeasuredRun] = ()) -> tuple[DeviceProfile, list[dict]]:
    """:func:`fit_compute` on the layer timings divided by their run's host factor (:func:`host_factors`: the
    emulation host's speed drifts between machines and runs; every run times a single-process reference generation).
    The factors are measured against a first fit on the timings as they are; the profile's ``reference_pace``
    against the final one. Rows whose results folder has no run among ``runs`` keep the ``host_factor`` stored with them
    (earlier calibrations' rows) and, without any folder, ``earlier_pace`` is kept, so that a calibration refitted
    from its own rows is the same. Returns the profile and the rows divided by their ``host_factor`` (compute and
    step wall times), the factor recorded in each."""
    def folder(p):
        return results_folder(p["run"]) if len(Path(p["run"]).parents) > 3 else ""

    def scale(factors):
        out = []
        for p in points:
            k = factors.get(folder(p)) or float(p.get("host_factor") or 1.0)
            out.append(p | {"seconds": p["seconds"] / k, "wall_s": p["wall_s"] / k, "host_factor": k})
        return out

    present = set(map(folder, points))
    runs = [r for r in runs if r.folder in present]
    scaled = scale(dict.fromkeys((r.folder for r in runs), 1.0))
    device = fit_compute(scaled, cores)

    def pace():
        paces = [x for x in (reference_pace(r, device) for r in runs) if x]
        return float(np.median(paces)) if paces else None

    device.reference_pace = pace()
    if device.reference_pace:
        scaled = scale(host_factors(runs, device))
        device = fit_compute(scaled, cores)
        device.reference_pace = pace()
    device.reference_pace = device.reference_pace or earlier_pace
    return device, scaled


def fit_codec_call(points: list[dict], calib: Calibration, device: str = "cpu") -> float:
    """Fixed cost per codec call in a run (K and V apiece): non-negative least squares of each compressed step's
    measured codec time minus the kernel bench's cost of its bytes, over its calls (layers x 2 x (1 encode +
    world-1 decodes)). Rows from earlier calibration files without the ``codec`` column are skipped."""
    from sklearn.linear_model import LinearRegression

    steps = {(p["run"], p["rank"], p["step"]): p for p in points if p.get("codec")}
    if not steps:
        return 0.0
    x, y = [], []
    for p in steps.values():
        per_layer = sum(calib.codec_kernel_seconds(p["codec"], op, p["kv_bytes"], device) * n
                        for op, n in (("encode", 1), ("decode", p["world"] - 1)))
        x.append([p["layers"] * 2 * p["world"]])
        y.append(p["codec_s"] - p["layers"] * per_layer)
    m = LinearRegression(positive=True, fit_intercept=False).fit(np.array(x), np.array(y))
    return float(m.coef_[0])


def fit_codec(points: list[dict]) -> dict[str, tuple[float, float]]:
    from sklearn.linear_model import LinearRegression

    out = {}
    for key in sorted({(p["codec"], p["op"]) for p in points}):
        sel = [p for p in points if (p["codec"], p["op"]) == key]
        x = np.array([[p["bytes"]] for p in sel])
        y = np.array([p["seconds"] for p in sel])
        m = LinearRegression(positive=True).fit(x, y) if len(sel) > 1 else None
        out[f"{key[0]}/{key[1]}"] = (max(0.0, float(m.intercept_)), float(m.coef_[0])) if m else (0.0, float(y[0] / x[0, 0]))
    return out


HOP_START = (1.0, 1.0, 0.001, 1.0, 1e5, 0.5, 1.22, 0.0, 0.0, 0.0, 0.0, 1.0)  # also the terms the data cannot identify


HOP_LOWER = (0, 0, 0, 1, 0, 0, 0.3, 0, 0, 0, 0, 0.3)


HOP_UPPER = (10, 10, 1, 10, 1e8, 3, 1e3, 1, 100, 1e-6, 1, 5)   # C up to 1e3: the cap may fit as not binding


HOP_SCALE = (1, 1, 1e-3, 1, 1e5, 1, 1, 1, 1, 1e-8, 1e-3, 1)


HOP_FIT_START = dict(forwarding_s_per_byte=1 / 50e6, oversubscribed_hop_s=0.001)  # forwarding: 50 MB/s shared


ASYNC_PARAMS = ("async_transfer_factor",)    # identified by whole runs of DistriFusion only


ASYNC_START, ASYNC_LOWER, ASYNC_UPPER, ASYNC_SCALE = (1.0,), (0.3,), (2.0,), (1.0,)


def columns(points: list[dict]) -> dict[str, np.ndarray]:
    """Hop rows as arrays; a column an earlier calibration's rows lack (empty in its CSV) reads as 0."""
    return {k: np.array([p.get(k) or 0 for p in points], dtype=float) for k in HOP_COLUMNS}


def comm_seconds(params, col: dict[str, np.ndarray]) -> np.ndarray:
    """Predicted communication time of each hop row (K/V hops plus output-gather hops)."""
    hop = lambda nb: hop_seconds(params, col["rtt_s"], nb, col["rate_bytes"], col["bidirectional"],  # noqa: E731
                                 col["jitter_s"], col["loss"], col["burst_bytes"], col["forwarding"],
                                 col["oversubscription"])
    return col["kv_hops"] * hop(col["kv_bytes"]) + col["out_hops"] * hop(col["out_bytes"])


def fit_hops(points: list[dict]) -> tuple[float, ...]:
    """Bounded least squares of the per-step communication time, the wait for slower ranks' compute taken out
    (scipy.optimize.least_squares). A step whose wait was all for compute (nothing left for the links) says nothing
    about them and is left out. Residuals are log(predicted / measured) under a soft-L1 loss, so that the few steps
    whose transfers hid behind compute (ring attention overlaps its gather with the local block: a tenth of the
    modelled time measured) do not outweigh thousands of others. Jitter and loss terms are only identified when the points include jittery / lossy links;
    otherwise they keep their starting values (:data:`HOP_START`)."""
    from scipy.optimize import least_squares

    col = columns(points)
    target = col["comm_wait_s"] - col["imbalance_s"]
    keep = target > 0
    col, target = {k: v[keep] for k, v in col.items()}, target[keep]
    free = identified(points)

    def full(params):
        return [p if f else s for p, f, s in zip(params, free, HOP_START)]

    def residual(params):
        return np.log(np.maximum(comm_seconds(full(params), col) / target, 1e-9))

    x0 = [HOP_FIT_START.get(n, v) for n, v in zip(HOP_PARAMS, HOP_START)]
    fit = least_squares(residual, x0=x0, x_scale=HOP_SCALE, bounds=(HOP_LOWER, HOP_UPPER),
                        loss="soft_l1", f_scale=0.1)
    return tuple(float(v) for v in full(fit.x))


def identified(points: list[dict]) -> list[bool]:
    """Which hop parameters the rows can identify (jitter, loss, burst, forwarding and scheduling terms only where
    the rows have jittery, lossy, shaped, forwarded or oversubscribed links)."""
    col = columns(points)
    return [True] * 4 + [bool(col[k].any()) for k in ("bidirectional", "jitter_s", "loss", "burst_bytes", "loss",
                                                      "forwarding", "oversubscription", "bidirectional")]


def refine_hops_on_runs(results: list, calib: Calibration, free: list[bool] | None = None) -> int:
    """Refine the hop parameters (in place) so that the simulator reproduces the measured runs' latencies:
    bounded least squares (scipy) of each (scenario, link pass, method)'s relative error, median over its seeds,
    starting from the per-step fit. The per-step fit sees the time blocked on communication alone; whole runs
    also show how compute and communication combine in a step, the compute fit's errors included. ``free``:
    which of :data:`HOP_PARAMS` may move (default: all). ``results``: paths or measured runs (:func:`.runs.read_runs`).
    Returns the number of cases fitted (0: none, unchanged)."""
    from scipy.optimize import least_squares

    cases = measured_cases(results, calib=calib)
    if not cases:
        return 0
    free = list(free or [True] * len(HOP_PARAMS))
    free += [any(c.workload.method.stale_kv for c in cases)] * len(ASYNC_PARAMS)
    names = [n for n, f in zip(HOP_PARAMS + ASYNC_PARAMS, free) if f]
    lo, hi, scale = (np.array([v for v, f in zip(vals, free) if f]) for vals in
                     (HOP_LOWER + ASYNC_LOWER, HOP_UPPER + ASYNC_UPPER, HOP_SCALE + ASYNC_SCALE))

    def residual(x):
        for n, v in zip(names, x):
            setattr(calib, n, float(v))
        return relative_errors(cases, calib)

    x0 = np.clip([getattr(calib, n) for n in names], lo, hi)
    fit = least_squares(residual, x0=x0, x_scale=scale, bounds=(lo, hi), diff_step=1e-3)
    residual(fit.x)
    return len(cases)


def relative_errors(cases: list, calib: Calibration) -> np.ndarray:
    """Each measured case's predicted latency over its measured one (median over seeds), less 1."""
    return np.array([Simulator(c.workload, c.cluster, calib).run().latency_s / c.median_s - 1 for c in cases])


def refine_rtt_factor_on_runs(runs: list, calib: Calibration, algorithm: str) -> int:
    """Fit ``algorithm``'s round trips per hop (``calib.rtt_factor_by_algorithm``, in place) so that the simulator
    reproduces whole runs made under it, every other constant held: bounded least squares (scipy) of each case's
    relative error under a soft-L1 loss, so that a run whose one reference was disturbed (its compute mispriced)
    does not pull the round trips to make up for it. Returns the number of cases fitted."""
    from scipy.optimize import least_squares

    cases = measured_cases(runs, calib=calib)

    def residual(x):
        calib.rtt_factor_by_algorithm[algorithm] = float(x[0])
        return relative_errors(cases, calib)

    fit = least_squares(residual, x0=[calib.rtt_factor(algorithm)], bounds=([0.2], [5.0]), diff_step=1e-3,
                        loss="soft_l1", f_scale=0.1)
    residual(fit.x)
    return len(cases)


def rtt_factors(bench: list[dict], calib: Calibration) -> dict[str, float]:
    """Round trips per hop of each TCP algorithm over the calibration's own (:attr:`Calibration.congestion_control`),
    from link micro-benchmark rows measured under both in one run: per (ranks, link, message size), the measured time
    less the hop model's terms other than its round trips, one algorithm's over the other's; the median over the
    points."""
    ref = calib.congestion_control
    no_rtt = tuple(0.0 if n == "hop_rtt_factor" else v for n, v in zip(HOP_PARAMS, calib.hop_params()))
    groups: dict[tuple, dict[str, dict]] = {}
    for r in bench:
        key = (r["kv_hops"], r["rtt_s"], r["rate_bytes"], r["jitter_s"], r["loss"], r["kv_bytes"])
        groups.setdefault(key, {})[r["congestion_control"]] = r
    ratios: dict[str, list[float]] = {}
    for group in groups.values():
        if ref not in group:
            continue
        rtt_part = {a: r["comm_wait_s"] - float(comm_seconds(no_rtt, columns([r]))[0]) for a, r in group.items()}
        for a, part in rtt_part.items():
            if a != ref and rtt_part[ref] > 0:
                ratios.setdefault(a, []).append(part / rtt_part[ref])
    return {a: float(np.median(v)) for a, v in ratios.items()}
