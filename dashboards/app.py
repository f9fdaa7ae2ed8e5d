"""The Dash app: a what-if explorer (calibrated simulator) and a measured-results browser.

Callbacks only read controls, call the pure functions in ``whatif.py`` / ``results.py`` and place figures;
bad input becomes a message under the controls. Served on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from ..netem.profiles import named_profiles
from ..scenarios.schema import METHOD_PRESETS, ScenarioError
from ..simulator.costs import Calibration
from . import results as R
from . import whatif as W


def _num(id_, value, **kw):
    return dcc.Input(id=id_, type="number", value=value, debounce=True, style={"width": "90px"}, **kw)


def _field(label, control):
    return html.Div([html.Label(label, style={"fontSize": "12px", "display": "block"}), control],
                    style={"display": "inline-block", "marginRight": "14px", "verticalAlign": "top"})


def whatif_tab(calib: Calibration) -> html.Div:
    d = W.WhatIf()
    profiles = [{"label": n, "value": n} for n in named_profiles()] + [{"label": "custom", "value": "custom"}]
    return html.Div([
        html.Div([
            _field("nodes", _num("nodes", d.nodes, min=1, max=W.MAX_NODES, step=1)),
            _field("link profile", dcc.Dropdown(id="profile", options=profiles, value=d.profile, clearable=False,
                                                style={"width": "170px"})),
            _field("rate Mbit/s", _num("rate", d.rate_mbit, min=0)),
            _field("delay ms", _num("delay", d.delay_ms, min=0)),
            _field("jitter ms", _num("jitter", d.jitter_ms, min=0)),
            _field("loss %", _num("loss", d.loss_pct, min=0, max=99)),
            _field("model", dcc.Dropdown(id="model", options=list(W.MODELS), value=d.model, clearable=False,
                                         style={"width": "160px"})),
            _field("resolution px", _num("resolution", d.resolution, min=4, step=2)),
            _field("images", _num("images", d.images, min=1, max=1024, step=1)),
            _field("steps", _num("steps", d.steps, min=1, max=1000, step=1)),
            _field("guidance (CFG)", _num("guidance", d.guidance, min=0, max=50, step=0.5)),
            _field("method", dcc.Dropdown(id="method", options=list(METHOD_PRESETS), value=d.method, clearable=False,
                                          style={"width": "190px"})),
            _field("ulysses degree (usp)", _num("ulysses", d.ulysses_degree, min=1, max=64, step=1)),
            _field("warmup", dcc.RadioItems(id="warmup", options=["local", "sync"], value=d.warmup, inline=True)),
            _field("compute profile", dcc.Dropdown(id="device", value="cpu", clearable=False, style={"width": "340px"},
                                                   options=W.device_options(calib))),
            _field("GPUs per machine", _num("gpus", d.gpus_per_node, min=1, max=64, step=1)),
            _field("inside a machine", dcc.Dropdown(id="intra", options=W.link_options("intra"), value=d.intra_node,
                                                    clearable=False, style={"width": "150px"})),
            _field("between machines", dcc.Dropdown(id="inter", options=W.link_options("nic"), value=d.inter_node,
                                                    clearable=False, style={"width": "170px"})),
        ]),
        html.Div(id="message", style={"color": "#b00020", "minHeight": "20px", "margin": "6px 0"}),
        html.Div(id="note", style={"color": "#8a6d00", "minHeight": "0px", "margin": "0 0 6px"}),
        html.Div([html.Span("latency: "), html.B(id="latency"), html.Span("   speedup vs ring: "), html.B(id="vs-ring"),
                  html.Span("   vs DistriFusion: "), html.B(id="vs-df"), html.Span("   on the wire: "),
                  html.B(id="bytes")], style={"fontSize": "16px"}),
        html.Div(id="breakdown", style={"color": "#555", "margin": "4px 0 8px"}),
        dcc.Graph(id="timeline"),
        dcc.Graph(id="curves"),
    ])


def results_tab(folders: list[R.ResultsFolder]) -> html.Div:
    options = [{"label": f.label, "value": str(f.path)} for f in folders]
    return html.Div([
        html.Div("No results folders given: start with `scenario dashboard results/`." if not folders else "",
                 id="results-empty"),
        _field("results folder", dcc.Dropdown(id="folder", options=options, value=options[0]["value"] if options else None,
                                              style={"width": "420px"})),
        _field("links", dcc.RadioItems(id="links", options=[], value=None, inline=True)),
        html.Div([dcc.Graph(id="m-latency", style={"width": "50%", "display": "inline-block"}),
                  dcc.Graph(id="m-breakdown", style={"width": "50%", "display": "inline-block"})]),
        html.Div([dcc.Graph(id="m-bytes", style={"width": "50%", "display": "inline-block"}),
                  dcc.Graph(id="m-pareto", style={"width": "50%", "display": "inline-block"})]),
        dcc.Graph(id="m-predicted"),
        dcc.Graph(id="m-samples"),
    ])


def create_app(result_roots: list[Path], calib: Calibration) -> Dash:
    folders = R.find_results(result_roots)
    by_path = {str(f.path): f for f in folders}
    app = Dash(__name__, title="compactbed")
    app.layout = html.Div([
        html.H3("compactbed: residual-compressed parallel DiT inference on slow links"),
        dcc.Tabs([dcc.Tab(label="What-if (simulator)", children=whatif_tab(calib)),
                  dcc.Tab(label="Measured results", children=results_tab(folders))]),
    ], style={"fontFamily": "sans-serif", "margin": "12px"})

    @app.callback(
        [Output(i, "children") for i in ("message", "note", "latency", "vs-ring", "vs-df", "bytes", "breakdown")]
        + [Output("timeline", "figure"), Output("curves", "figure")],
        [Input(i, "value") for i in ("nodes", "profile", "rate", "delay", "jitter", "loss", "model", "resolution",
                                     "images", "steps", "guidance", "method", "ulysses", "warmup", "device", "gpus",
                                     "intra", "inter")])
    def update_whatif(nodes, profile, rate, delay, jitter, loss, model, resolution, images, steps, guidance, method,
                      ulysses, warmup, device, gpus, intra, inter):
        empty = go.Figure()
        try:
            if None in (nodes, resolution, images, steps):
                raise ScenarioError("fill in nodes, resolution, images and steps")
            w = W.WhatIf.of(dict(nodes=nodes, profile=profile, rate_mbit=rate or None, delay_ms=delay or 0,
                                 jitter_ms=jitter or 0, loss_pct=loss or 0, model=model, resolution=resolution,
                                 images=images, steps=steps, guidance=1.0 if guidance is None else guidance,
                                 method=method, ulysses_degree=ulysses or 1,
                                 warmup=warmup, device=device, gpus_per_node=gpus or 1, intra_node=intra,
                                 inter_node=inter))
            rows, detail = W.answer(w, calib)
            text = W.summary_text(rows, w.method)
            return ("", W.profile_note(w), text["latency"], text["vs_ring"], text["vs_distrifusion"], text["bytes"],
                    text["breakdown"], W.timeline_figure(detail, w.steps), W.bandwidth_curves(w, calib))
        except (ScenarioError, ValueError, KeyError) as e:
            first = str(e).splitlines()
            msg = "; ".join(first[1:] or first) if first else "invalid input"
            return (msg, "", "-", "-", "-", "-", "", empty, empty)

    @app.callback([Output("links", "options"), Output("links", "value")], [Input("folder", "value")])
    def folder_passes(path):
        folder = by_path.get(path)
        passes = folder.passes if folder else []
        return passes, passes[0] if passes else None

    @app.callback([Output(i, "figure") for i in ("m-latency", "m-breakdown", "m-bytes", "m-pareto", "m-predicted",
                                                 "m-samples")],
                  [Input("folder", "value"), Input("links", "value")])
    def update_results(path, links):
        folder = by_path.get(path)
        if folder is None or not folder.passes:
            return [go.Figure()] * 6
        links = links if links in folder.passes else folder.passes[0]
        pred, _ = R.predicted_vs_measured(folder, calib)
        return (R.latency_figure(folder), R.breakdown_figure(folder, links), R.bytes_figure(folder, links),
                R.pareto_figure(folder, links), pred, R.samples_figure(folder, links))

    return app
