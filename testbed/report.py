"""What a results folder reports: summary rows from the method runs' records, speedups, the summary files, the
table printed at the end and the plots."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..runtime.records import (STALE_BASELINE, UNCOMPRESSED_BASELINE, MethodResult, RunState, read_run, read_steps,
                               speedups, write_atomic)
from ..runtime.records import write_summary as write_summary_json
from ..scenarios.schema import MethodSpec


def collect(run_dir: Path, method: MethodSpec, seed: int) -> MethodResult:
    """Read a finished method run's records into a summary row."""
    run = read_run(run_dir)
    records = read_steps(run_dir)
    steps = [r for r in records if r.rank == 0]
    n_ranks = len({r.rank for r in records})
    sent = sum(r.bytes_sent for r in records)
    raw = sum(r.bytes_uncompressed for r in records)
    return MethodResult(
        method=method.name, seed=seed, latency_s=run.latency_s,
        step_s_mean=float(np.mean([r.wall_s for r in steps])),
        compute_s=sum(r.compute_s for r in records) / n_ranks,
        comm_wait_s=sum(r.comm_wait_s for r in records) / n_ranks,
        codec_s=sum(r.codec_s for r in records) / n_ranks,
        bytes_on_wire=sent, bytes_uncompressed=raw, compression_ratio=raw / sent if sent else None,
        base_consistency=run.base_consistency, launch_job=run.launch_job)


def add_speedups(rows: list[MethodResult]) -> None:
    """Ratios within the same seed and link pass; shaped rows also get their bound and ideal (same method, same
    seed), and bound rows their ideal."""
    for seed, links in {(r.seed, r.links) for r in rows}:
        same = {r.method: r for r in rows if r.seed == seed and r.links == links and r.latency_s}
        for name, (vs_base, vs_stale) in speedups({m: r.latency_s for m, r in same.items()}).items():
            same[name].speedup_vs_uncompressed, same[name].speedup_vs_distrifusion = vs_base, vs_stale
    of = {(r.links, r.method, r.seed): r.latency_s for r in rows if r.links in ("bound", "ideal") and r.latency_s}
    for r in rows:
        bound, ideal = of.get(("bound", r.method, r.seed)), of.get(("ideal", r.method, r.seed))
        if r.links == "shaped" and r.latency_s and bound:
            r.latency_bound_s, r.over_bound = bound, r.latency_s / bound
        if r.links in ("shaped", "bound") and r.latency_s and ideal:
            r.latency_ideal_s, r.over_ideal = ideal, r.latency_s / ideal


def print_table(rows: list[MethodResult], console: Console, title: str) -> None:
    t = Table(title=title)
    stale = any(r.method == STALE_BASELINE and r.ok for r in rows)      # no "vs distrifusion" without it
    for col in ("method", "seed", "links", "latency s", f"vs {UNCOMPRESSED_BASELINE}",
                *([f"vs {STALE_BASELINE}"] if stale else []),
                "bound s", "x bound", "ideal s", "x ideal", "MB on wire", "ratio", "PSNR dB", "SSIM", "cls agree",
                "status"):
        t.add_column(col, justify="right" if col not in ("method", "status") else "left")

    def f(v, fmt, unit=""):
        return "-" if v is None else format(v, fmt) + unit

    for r in rows:
        q = r.quality
        t.add_row(r.method, str(r.seed), r.links, f(r.latency_s, ".2f"), f(r.speedup_vs_uncompressed, ".2f", "x"),
                  *([f(r.speedup_vs_distrifusion, ".2f", "x")] if stale else []),
                  f(r.latency_bound_s, ".2f"), f(r.over_bound, ".2f"), f(r.latency_ideal_s, ".2f"),
                  f(r.over_ideal, ".2f"),
                  f(r.bytes_on_wire and r.bytes_on_wire / 1e6, ".2f"),
                  f(r.compression_ratio, ".1f"), f(q.get("psnr_db"), ".1f"), f(q.get("ssim"), ".3f"),
                  f(q.get("agreement_with_reference"), ".2f"),
                  r.status if r.status == "ok" else escape(f"FAILED: {r.error}"))
    console.print(t)


def write_summary(results_dir: Path, rows: list[MethodResult], meta: dict, state: RunState) -> None:
    """summary.json (metadata, state, rows) and summary.csv (one flat line per row), each written atomically."""
    write_summary_json(results_dir, meta, state, rows)
    flat = [{k: v for k, v in asdict(r).items() if not isinstance(v, dict)} | {f"quality_{k}": v for k, v in r.quality.items()}
            for r in rows]
    keys = sorted({k for row in flat for k in row}, key=lambda k: (k.startswith("quality_"), k))
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=keys)
    w.writeheader()
    w.writerows(flat)
    write_atomic(results_dir / "summary.csv", out.getvalue())


def write_plots(results_dir: Path, rows: list[MethodResult]) -> None:
    import plotly.graph_objects as go

    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return
    names = [f"{r.method}/s{r.seed}/{r.links}" for r in ok]
    lat = go.Figure(go.Bar(x=names, y=[r.latency_s for r in ok]), layout=dict(title="latency (s)"))
    parts = go.Figure(layout=dict(title="time per rank (s): compute / blocked on communication / codec", barmode="stack"))
    for label, attr in (("compute", "compute_s"), ("comm wait", "comm_wait_s"), ("codec", "codec_s")):
        parts.add_bar(x=names, y=[getattr(r, attr) for r in ok], name=label)
    wire = go.Figure(go.Bar(x=names, y=[r.bytes_on_wire / 1e6 for r in ok]), layout=dict(title="MB on the wire (all ranks)"))
    html = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate((lat, parts, wire))]
    (results_dir / "plots.html").write_text("<html><body>" + "\n".join(html) + "</body></html>")
