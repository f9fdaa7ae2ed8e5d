"""``scenario run``: every method of a scenario, launched as real ranks, recorded into a results folder.

Results folder (``<output>/<timestamp>/``), plain files with a stated schema:
  scenario.yaml          the validated scenario, as run
  environment.json       versions, CPU/GPU, link mode, codec backend
  reference/seed<k>.npy  single-process diffusers images (ground truth for quality)
  <method>/seed<k>/      job.json, rank<r>.jsonl (one record per step, see runtime.engine), run.json,
                         images.npy, launcher logs; rank<r>.error when a rank failed
  summary.json / .csv    one row per (method, seed): latency, speedups, bytes, ratio, quality, status
  plots.html             latency, time breakdown and bytes per method (plotly)
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..runtime.engine import Job, model_dir
from .launch import RunFailed, local_torchrun, run_ranks
from .scenario import MethodSpec, Scenario

UNCOMPRESSED_BASELINE = "ring"


@dataclass
class MethodResult:
    """One row of the summary."""

    method: str
    seed: int
    status: str = "ok"
    error: str = ""
    latency_s: float | None = None
    step_s_mean: float | None = None
    compute_s: float | None = None
    comm_wait_s: float | None = None
    codec_s: float | None = None
    bytes_on_wire: int | None = None
    bytes_uncompressed: int | None = None
    compression_ratio: float | None = None
    speedup_vs_uncompressed: float | None = None
    speedup_vs_distrifusion: float | None = None
    quality: dict = field(default_factory=dict)
    base_consistency: dict = field(default_factory=dict)


def environment(link_mode: str) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return dict(python=platform.python_version(), platform=platform.platform(), cpu=platform.processor(),
                cpus=__import__("os").cpu_count(), gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                link_mode=link_mode, packages={p: version(p) for p in (
                    "torch", "xfuser", "diffusers", "numba", "triton", "compactbed", "simpy", "dash")},
                started=datetime.datetime.now().isoformat(timespec="seconds"))


def reference_images(scenario: Scenario, seed: int) -> tuple[np.ndarray, float, object]:
    """Single-process diffusers sampling with the same seed; also returns its wall time and the model."""
    from ..runtime.sampling import sample_reference
    from ..runtime.tiny_model import load_tiny_model

    model = load_tiny_model(model_dir(scenario), getattr(torch, scenario.model.dtype))
    t0 = time.perf_counter()
    images = sample_reference(model, torch.tensor(scenario.labels), scenario.steps, seed, scenario.guidance).numpy()
    return images, time.perf_counter() - t0, model


def collect(run_dir: Path, method: MethodSpec, seed: int) -> MethodResult:
    """Read a finished method run's records into a summary row."""
    run = json.loads((run_dir / "run.json").read_text())
    records = [json.loads(line) for f in sorted(run_dir.glob("rank*.jsonl")) for line in f.open()]
    steps = [r for r in records if r["rank"] == 0]
    n_ranks = len({r["rank"] for r in records})
    sent = sum(r["bytes_sent"] for r in records)
    raw = sum(r["bytes_uncompressed"] for r in records)
    return MethodResult(
        method=method.name, seed=seed, latency_s=run["latency_s"],
        step_s_mean=float(np.mean([r["wall_s"] for r in steps])),
        compute_s=sum(r["compute_s"] for r in records) / n_ranks,
        comm_wait_s=sum(r["comm_wait_s"] for r in records) / n_ranks,
        codec_s=sum(r["codec_s"] for r in records) / n_ranks,
        bytes_on_wire=sent, bytes_uncompressed=raw, compression_ratio=raw / sent if sent else None,
        base_consistency=run.get("base_consistency", {}))


def add_speedups(rows: list[MethodResult]) -> None:
    for seed in {r.seed for r in rows}:
        same = {r.method: r for r in rows if r.seed == seed and r.latency_s}
        base, df = same.get(UNCOMPRESSED_BASELINE), same.get("distrifusion")
        for r in same.values():
            r.speedup_vs_uncompressed = base.latency_s / r.latency_s if base else None
            r.speedup_vs_distrifusion = df.latency_s / r.latency_s if df else None


def print_table(rows: list[MethodResult], console: Console, title: str) -> None:
    t = Table(title=title)
    for col in ("method", "seed", "latency s", f"vs {UNCOMPRESSED_BASELINE}", "vs distrifusion", "MB on wire",
                "ratio", "PSNR dB", "SSIM", "cls agree", "status"):
        t.add_column(col, justify="right" if col not in ("method", "status") else "left")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        q = r.quality
        t.add_row(r.method, str(r.seed), f(r.latency_s, ".2f"), f(r.speedup_vs_uncompressed, ".2f") + "x",
                  f(r.speedup_vs_distrifusion, ".2f") + "x", f(r.bytes_on_wire and r.bytes_on_wire / 1e6, ".2f"),
                  f(r.compression_ratio, ".1f"), f(q.get("psnr_db"), ".1f"), f(q.get("ssim"), ".3f"),
                  f(q.get("agreement_with_reference"), ".2f"), r.status if r.status == "ok" else f"FAILED: {r.error}")
    console.print(t)


def write_summary(results_dir: Path, rows: list[MethodResult], meta: dict) -> None:
    data = dict(meta, rows=[asdict(r) for r in rows])
    (results_dir / "summary.json").write_text(json.dumps(data, indent=1, default=float))
    flat = [{k: v for k, v in asdict(r).items() if not isinstance(v, dict)} | {f"quality_{k}": v for k, v in r.quality.items()}
            for r in rows]
    keys = sorted({k for row in flat for k in row}, key=lambda k: (k.startswith("quality_"), k))
    with open(results_dir / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(flat)


def write_plots(results_dir: Path, rows: list[MethodResult]) -> None:
    import plotly.graph_objects as go

    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return
    names = [f"{r.method}/s{r.seed}" for r in ok]
    lat = go.Figure(go.Bar(x=names, y=[r.latency_s for r in ok]), layout=dict(title="latency (s)"))
    parts = go.Figure(layout=dict(title="time per rank (s): compute / blocked on communication / codec", barmode="stack"))
    for label, attr in (("compute", "compute_s"), ("comm wait", "comm_wait_s"), ("codec", "codec_s")):
        parts.add_bar(x=names, y=[getattr(r, attr) for r in ok], name=label)
    wire = go.Figure(go.Bar(x=names, y=[r.bytes_on_wire / 1e6 for r in ok]), layout=dict(title="MB on the wire (all ranks)"))
    html = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate((lat, parts, wire))]
    (results_dir / "plots.html").write_text("<html><body>" + "\n".join(html) + "</body></html>")


def run_scenario(scenario: Scenario, output: Path, console: Console, backend: str = "auto") -> tuple[Path, list[MethodResult]]:
    """Run every (seed, method); failures are recorded and the remaining methods still run."""
    from ..runtime.quality import compare

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = output / stamp
    results.mkdir(parents=True, exist_ok=False)
    (results / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False))
    link_mode = "loopback (unshaped)"
    (results / "environment.json").write_text(json.dumps(environment(link_mode), indent=1))
    console.print(f"[bold]{scenario.name}[/]: {scenario.world_size} ranks, {len(scenario.methods)} methods, "
                  f"{scenario.steps} steps, links: {link_mode} -> {results}")
    rows: list[MethodResult] = []
    for seed in scenario.seeds:
        ref, ref_s, model = reference_images(scenario, seed)
        (results / "reference").mkdir(exist_ok=True)
        np.save(results / "reference" / f"seed{seed}.npy", ref)
        console.print(f"single-process reference (seed {seed}): {ref_s:.2f} s")
        with Progress(TextColumn("{task.description:<24}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            for method in scenario.methods:
                run_dir = results / method.name / f"seed{seed}"
                run_dir.mkdir(parents=True)
                job = Job(scenario=scenario, method=method, seed=seed, out_dir=str(run_dir.resolve()), backend=backend)
                job_file = run_dir / "job.json"
                job_file.write_text(job.model_dump_json(indent=1))
                task = progress.add_task(method.name, total=scenario.steps)
                try:
                    run_ranks(local_torchrun(job_file, scenario.world_size), run_dir,
                              timeout_s=scenario.timeout_s * 4 + 60,
                              on_step=lambda k, n, task=task: progress.update(task, completed=k))
                    row = collect(run_dir, method, seed)
                    row.quality = compare(np.load(run_dir / "images.npy"), ref, scenario.labels, model.classifier)
                except RunFailed as e:
                    row = MethodResult(method=method.name, seed=seed, status="failed", error=str(e))
                    progress.update(task, description=f"{method.name} [red]failed")
                rows.append(row)
                add_speedups(rows)
                write_summary(results, rows, dict(scenario=scenario.name, link_mode=link_mode,
                                                  reference_latency_s={seed: ref_s}))
    write_plots(results, rows)
    print_table(rows, console, f"{scenario.name} ({link_mode})")
    console.print(f"results: {results}")
    return results, rows
