"""Measured results browser: pure functions over results folders written by ``scenario run`` (no Dash here)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import yaml
from plotly.subplots import make_subplots

from ..runtime.records import MethodResult, RunState, read_state, read_summary
from ..simulator.costs import Calibration
from ..simulator.predict import Case, mape, validate
from .style import empty_figure, title


@dataclass
class ResultsFolder:
    """One ``<output>/<timestamp>/`` folder and its summary rows."""

    path: Path
    scenario: dict
    rows: list[MethodResult]
    state: RunState

    @property
    def label(self) -> str:
        """The output folder and timestamp, the methods, and the state (runs of one scenario told apart)."""
        methods = ", ".join(dict.fromkeys(r.method for r in self.rows)) or "no method runs"
        state = self.state.state + (", contaminated" if self.state.contaminated else "")
        return f"{self.path.parent.name} / {self.path.name}: {methods} ({state})"

    @property
    def passes(self) -> list[str]:
        """The link passes with rows, in run order (shaped, bound, ideal, or loopback)."""
        return list(dict.fromkeys(r.links for r in self.rows))


def find_results(roots: list[Path]) -> list[ResultsFolder]:
    """Every results folder (one with summary.json) under the given roots, newest first."""
    found = []
    for root in roots:
        for summary in Path(root).rglob("summary.json"):
            folder = summary.parent
            try:
                _, rows = read_summary(folder)
                state = read_state(folder)
                scenario = yaml.safe_load((folder / "scenario.yaml").read_text())
            except (OSError, ValueError, KeyError, yaml.YAMLError):
                continue
            found.append(ResultsFolder(folder, scenario, rows, state))
    return sorted(found, key=lambda r: r.path.name, reverse=True)


def _ok(rows: list[MethodResult], links: str | None = None) -> list[MethodResult]:
    return [r for r in rows if r.ok and (links is None or r.links == links)]


def latency_figure(folder: ResultsFolder) -> go.Figure:
    fig = go.Figure()
    for links in sorted({r.links for r in folder.rows}):
        rows = _ok(folder.rows, links)
        fig.add_bar(x=[r.method for r in rows], y=[r.latency_s for r in rows], name=links)
    fig.update_layout(title=title("latency per method (s)"), barmode="group", height=330, margin=dict(t=60, b=40))
    return fig


def breakdown_figure(folder: ResultsFolder, links: str) -> go.Figure:
    rows = _ok(folder.rows, links)
    fig = go.Figure()
    for label, key in (("compute", "compute_s"), ("blocked on communication", "comm_wait_s"), ("codec", "codec_s")):
        fig.add_bar(x=[r.method for r in rows], y=[getattr(r, key) for r in rows], name=label)
    fig.update_layout(title=title(f"time per rank, {links} links (s)"), barmode="stack", height=330, margin=dict(t=60, b=40))
    return fig


def bytes_figure(folder: ResultsFolder, links: str) -> go.Figure:
    rows = _ok(folder.rows, links)
    fig = go.Figure(go.Bar(x=[r.method for r in rows], y=[r.bytes_on_wire / 1e6 for r in rows],
                           text=[f"{r.compression_ratio:.1f}x" for r in rows], textposition="outside"))
    fig.update_layout(title=title("MB on the wire (all ranks; label: compression ratio)"), height=330, margin=dict(t=60, b=40))
    return fig


def pareto_figure(folder: ResultsFolder, links: str) -> go.Figure:
    """Quality (PSNR vs the single-process reference) against latency; exact methods capped for display."""
    rows = _ok(folder.rows, links)
    psnr = [min(r.quality["psnr_db"], 60.0) for r in rows]
    fig = go.Figure(go.Scatter(x=[r.latency_s for r in rows], y=psnr, mode="markers+text",
                               text=[r.method for r in rows], textposition="top center", marker_size=12))
    fig.update_layout(title=title("quality vs latency (PSNR capped at 60 dB = exact)"), xaxis_title="latency (s)",
                      yaxis_title="PSNR (dB)", height=360, margin=dict(t=60, b=40))
    return fig


def predicted_vs_measured(folder: ResultsFolder, calib: Calibration) -> tuple[go.Figure, list[Case]]:
    """The simulator's prediction for every measured row (``simulator.predict.validate``) as an overlay; a figure
    that says why where there is nothing to compare (an incomplete run, or loopback runs only)."""
    if not folder.state.usable:
        return empty_figure(f"no prediction: the run is {folder.state.state}"
                            + (", contaminated" if folder.state.contaminated else "")), []
    cases = validate([folder.path], calib)
    if not cases:
        return empty_figure("no prediction: no runs on emulated links (loopback runs are not on the modelled links)"), []
    labels = [f"{c.method} ({c.links})" for c in cases]
    fig = go.Figure()
    fig.add_bar(x=labels, y=[c.measured_s for c in cases], name="measured")
    fig.add_bar(x=labels, y=[c.predicted_s for c in cases], name="predicted")
    fig.update_layout(title=title(f"predicted vs measured latency (MAPE {mape(cases):.1%})"), barmode="group", height=360,
                      margin=dict(t=60, b=80))
    return fig, cases


def samples_figure(folder: ResultsFolder, links: str, count: int = 8) -> go.Figure:
    """The first generated images of every method beside the single-process reference."""
    seed = min({r.seed for r in folder.rows} or {0})
    panels = [("reference", folder.path / "reference" / f"seed{seed}.npy")]
    panels += [(r.method, folder.path / links / r.method / f"seed{seed}" / "images.npy")
               for r in _ok(folder.rows, links) if r.seed == seed]
    panels = [(n, p) for n, p in panels if p.is_file()]
    fig = make_subplots(rows=len(panels) or 1, cols=1, subplot_titles=[n for n, _ in panels], vertical_spacing=0.04)
    for i, (_, path) in enumerate(panels, start=1):
        strip = np.concatenate(list(np.load(path)[:count]), axis=-1)       # [C, H, W * count]
        if strip.shape[0] == 3:                                              # RGB (pipeline folders)
            rgb = ((strip.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8)
            fig.add_image(z=rgb, row=i, col=1)
        else:
            fig.add_heatmap(z=strip[0][::-1], colorscale="gray", showscale=False, zmin=-1, zmax=1, row=i, col=1)
        fig.update_xaxes(visible=False, row=i, col=1)
        fig.update_yaxes(visible=False, scaleanchor=f"x{i if i > 1 else ''}", scaleratio=1, row=i, col=1)
    fig.update_layout(title=title("samples (same seed) beside the single-process reference"),
                      height=190 * max(len(panels), 1) + 60, margin=dict(t=60, b=10, l=10, r=10))
    return fig
