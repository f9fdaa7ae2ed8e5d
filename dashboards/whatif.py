"""What-if explorer: pure functions from control values to simulator answers and figures (no Dash here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import plotly.graph_objects as go
from pydantic import Field, TypeAdapter, ValidationError

from ..netem.profiles import named_profiles
from ..runtime.records import speedups
from ..scenarios.schema import METHOD_PRESETS, Scenario, ScenarioError, format_errors, parse_scenario
from ..simulator.costs import Calibration
from ..simulator.hardware import shipped
from ..simulator.model import Prediction
from ..simulator.predict import PredictedRow, predict, predict_latencies
from .style import empty_figure, title

MODELS = {"tiny_flux_mnist": 16, "flux.1-dev": 1024, "cogvideox-5b": 720,      # default resolution per model
          "hunyuanvideo": 1280, "pixart-alpha": 1024}
COMPARED = ["ring", "patch", "distrifusion", "ulysses", "compact-1bit", "compact-2bit", "compact-lowrank"]
CURVE_RATES_MBIT = [10, 25, 50, 100, 250, 500, 1000, 2500, 10_000]
MAX_NODES = 64                  # the explorer's range; `scenario predict` takes more
CURVE_MAX_NODES = 16            # the curves simulate every method at every rate: kept interactive
CPU_DEVICE = "cpu: the emulation host (2 cores, calibrated on emulated runs)"


def device_options(calib: Calibration) -> list[dict]:
    """The emulation host's calibrated profile and every shipped GPU (with its peak and memory bandwidth)."""
    gpus = shipped().devices
    return [{"label": CPU_DEVICE if k == "cpu" else k, "value": k} for k in calib.devices if k not in gpus] + \
        [{"label": f"{k}: {d.peak_tflops:g} TFLOPS bf16, {d.hbm_gbs:g} GB/s", "value": k} for k, d in gpus.items()]


def link_options(scope: str) -> list[str]:
    return [k for k, x in shipped().links.items() if x.scope == scope]


@dataclass
class WhatIf:
    """The explorer's controls."""

    nodes: Annotated[int, Field(ge=1, le=MAX_NODES)] = 4
    profile: str = "edge_100m_5ms"        # a named profile (every node's access link), or "custom"
    rate_mbit: Annotated[float, Field(gt=0, le=400_000, allow_inf_nan=False)] | None = 100
    delay_ms: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)] = 10
    jitter_ms: Annotated[float, Field(ge=0, le=10_000, allow_inf_nan=False)] = 0
    loss_pct: Annotated[float, Field(ge=0, lt=100, allow_inf_nan=False)] = 0
    model: str = "tiny_flux_mnist"
    resolution: Annotated[int, Field(ge=4, le=8192)] = 16
    images: Annotated[int, Field(ge=1, le=1024)] = 128
    steps: Annotated[int, Field(ge=1, le=1000)] = 20
    guidance: Annotated[float, Field(ge=0, le=50, allow_inf_nan=False)] = 1.0   # CFG scale (1: one pass per step)
    method: str = "compact-1bit"
    ulysses_degree: Annotated[int, Field(ge=1, le=MAX_NODES)] = 1    # for `usp` methods (ulysses x ring = nodes)
    warmup: str = "local"
    device: str = "cpu"
    gpus_per_node: Annotated[int, Field(ge=1, le=64)] = 1       # GPU devices only: ranks per machine,
    intra_node: str = "pcie4"                                    # joined by this class,
    inter_node: str = "ethernet_shaped"                          # machines by this NIC (and the link above)

    @classmethod
    def of(cls, controls: dict) -> "WhatIf":
        """The controls as sent by the browser, typed and bounded (a list, text or NaN where a number belongs is a
        ScenarioError naming the control, not a crash)."""
        try:
            return _CONTROLS.validate_python(controls)
        except ValidationError as e:
            raise ScenarioError(format_errors(e)) from None

    def link(self) -> dict | str:
        if self.profile != "custom":
            return self.profile
        return {"rate_mbit": self.rate_mbit or None, "delay_ms": self.delay_ms, "jitter_ms": self.jitter_ms,
                "loss_pct": self.loss_pct}


_CONTROLS = TypeAdapter(WhatIf)


def profile_note(w: WhatIf) -> str:
    """What the chosen compute profile models, where the model makes that matter."""
    if w.device == "cpu" and w.model != "tiny_flux_mnist":
        return (f"the cpu profile is the 2-core emulation host: {w.model} on it takes hours; choose a GPU")
    if w.device in shipped().devices:
        return (f"GPU cluster model: {w.gpus_per_node} {w.device} per machine over {w.intra_node}, machines through "
                f"{w.inter_node} and the link above (no per-rank timeline drawn)")
    return ""


def scenario_of(w: WhatIf, methods: list[str] | None = None, link=None) -> Scenario:
    """The controls as a validated scenario; raises ScenarioError with a readable message."""
    if w.model not in MODELS:
        raise ScenarioError(f"model: choose one of {', '.join(MODELS)}")
    methods = methods or list(dict.fromkeys([w.method, "ring", "distrifusion"]))
    if w.method not in METHOD_PRESETS:
        raise ScenarioError(f"method: choose one of {', '.join(METHOD_PRESETS)}")
    data = dict(name="whatif", nodes=w.nodes, link=link if link is not None else w.link(),
                model={"name": w.model}, resolution=w.resolution, labels=w.images, steps=w.steps, guidance=w.guidance,
                methods=methods, warmup={"mode": w.warmup, "steps": 1},
                parallel={"ulysses_degree": w.ulysses_degree})
    if w.device in shipped().devices:
        data["hardware"] = {"device": w.device, "gpus_per_node": w.gpus_per_node, "intra_node": w.intra_node,
                            "inter_node": w.inter_node}
    return parse_scenario(data, "what-if")


def answer(w: WhatIf, calib: Calibration) -> tuple[list[PredictedRow], Prediction]:
    """Predicted table rows for the chosen method and its baselines, and the chosen method's detail."""
    sc = scenario_of(w)
    rows, details = predict(sc, calib, w.device, timeline=True)
    return rows, details[w.method]


def timeline_figure(pred: Prediction, steps: int, ranks: int = 8, steps_shown: int = 3) -> go.Figure:
    """Per-rank Gantt of the first steps: compute / codec / communication."""
    colors = {"compute": "#4c78a8", "codec": "#f58518", "comm": "#e45756"}
    horizon = pred.latency_s * min(steps_shown, steps) / steps
    fig = go.Figure()
    for kind, color in colors.items():
        bars = [(r, s, e) for r, k, s, e in pred.timeline if k == kind and r < ranks and e > s and s < horizon]
        fig.add_bar(y=[f"rank {r}" for r, _, _ in bars], x=[e - s for _, s, e in bars],
                    base=[s for _, s, _ in bars], orientation="h", name=kind, marker_color=color)
    fig.update_layout(title=title(f"per-rank timeline, first {min(steps_shown, steps)} steps"), barmode="overlay",
                      xaxis_title="seconds", xaxis_range=[0, horizon], height=320,
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig


def bandwidth_curves(w: WhatIf, calib: Calibration, rates=CURVE_RATES_MBIT) -> go.Figure:
    """Speedup over uncompressed ring vs link rate, every method, the chosen delay/jitter/loss kept (up to
    :data:`CURVE_MAX_NODES` nodes, so that the explorer answers within seconds)."""
    if w.nodes > CURVE_MAX_NODES:
        return empty_figure(f"speedup curves are drawn up to {CURVE_MAX_NODES} nodes (`scenario predict` for more)")
    base = named_profiles().get(w.profile) if w.profile != "custom" else None
    delay = base.delay_ms if base else w.delay_ms
    jitter = base.jitter_ms if base else w.jitter_ms
    loss = base.loss_pct if base else w.loss_pct
    methods = [m for m in COMPARED if not (m == "ulysses" and (w.nodes > 4 or 4 % w.nodes))]
    curves = {m: [] for m in methods}
    for rate in rates:
        sc = scenario_of(w, methods=methods, link={"rate_mbit": rate, "delay_ms": delay, "jitter_ms": jitter,
                                                   "loss_pct": loss})
        latency = predict_latencies(sc, calib, w.device)
        for m, (vs_ring, _) in speedups(latency).items():
            curves[m].append(vs_ring)
    fig = go.Figure()
    for m, ys in curves.items():
        fig.add_scatter(x=list(rates), y=ys, mode="lines+markers", name=m)
    fig.update_layout(title=title(f"speedup over uncompressed ring vs link rate ({w.nodes} nodes, {delay:g} ms)"),
                      xaxis_title="link rate (Mbit/s)", yaxis_title="speedup", xaxis_type="log", height=360,
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig


def summary_text(rows: list[PredictedRow], method: str) -> dict[str, str]:
    by = {r.method: r for r in rows}
    r = by[method]
    fmt = lambda v: "-" if v is None else f"{v:.2f}x"   # noqa: E731
    return {"latency": f"{r.latency_s:.2f} s", "vs_ring": fmt(r.speedup_vs_uncompressed),
            "vs_distrifusion": fmt(r.speedup_vs_distrifusion),
            "bytes": f"{r.bytes_on_wire / 1e6:.1f} MB ({r.bytes_uncompressed / max(r.bytes_on_wire, 1):.1f}x less than uncompressed)",
            "breakdown": f"compute {r.compute_s:.2f} s, communication {r.comm_s:.2f} s, codec {r.codec_s:.2f} s"}
