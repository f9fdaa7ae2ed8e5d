"""``scenario run``: every method of a scenario, launched as real ranks, recorded into a results folder.

Results folder (``<output>/<timestamp>/``), plain files with a stated schema:
  scenario.yaml          the validated scenario, as run
  environment.json       versions, CPU/GPU, link mode, codec backend
  reference/seed<k>.npy  single-process diffusers images (ground truth for quality)
  <pass>/<method>/seed<k>/  job.json, rank<r>.jsonl and run.json (typed in runtime.records),
                         images.npy, launcher logs; rank<r>.error when a rank failed
  summary.json / .csv    one row per (pass, method, seed): latency, speedups, bytes, ratio, quality, status
  plots.html             latency, time breakdown and bytes per method (plotly)
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..netem.cluster import EmulatedCluster, check_backend
from ..netem.commands import NODE_IF
from ..netem.probe import probe_link
from ..runtime.engine import Job
from ..runtime.models import DiTModel, ModelFolderError, check_conditions, load_for
from ..runtime.records import UNCOMPRESSED_BASELINE, MethodResult, read_run, read_steps, speedups
from ..scenarios.schema import MethodSpec, Scenario
from .launch import RunFailed, local_torchrun, node_torchrun, run_ranks


def environment(link_mode: str) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return dict(python=platform.python_version(), platform=platform.platform(), cpu=platform.processor(),
                cpus=os.cpu_count(), gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                link_mode=link_mode, packages={p: version(p) for p in (
                    "torch", "xfuser", "diffusers", "numba", "triton", "compactbed", "simpy", "dash")},
                started=datetime.datetime.now().isoformat(timespec="seconds"))


def checked_model(scenario: Scenario) -> DiTModel:
    """Load the scenario's model and check that its conditions and every method's split fit it."""
    model = load_for(scenario.model)
    check_conditions(model, scenario.conditions)
    for m in scenario.methods:
        u, r = scenario.degrees(m)
        try:
            model.check_layout(scenario.resolution, u * r, u)
        except ModelFolderError as e:
            raise ModelFolderError(f"method {m.name}: {e}") from None
    return model


REFERENCE_THREADS = 1     # like every rank (OMP_NUM_THREADS=1): the reference's time is the host's speed probe


def reference_images(model: DiTModel, scenario: Scenario, seed: int) -> tuple[np.ndarray, float]:
    """Single-process diffusers sampling with the same seed, and its wall time on REFERENCE_THREADS threads (the
    simulator compares it across runs to follow the host's speed)."""
    from ..runtime.sampling import sample_reference

    threads = torch.get_num_threads()
    torch.set_num_threads(REFERENCE_THREADS)
    try:
        t0 = time.perf_counter()
        images = sample_reference(model, scenario.conditions, scenario.resolution, scenario.steps, seed,
                                  scenario.guidance).numpy()
        return images, time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)


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
        base_consistency=run.base_consistency)


def add_speedups(rows: list[MethodResult]) -> None:
    """Ratios within the same seed and link pass; shaped rows also get their bound (same method, same seed)."""
    for seed, links in {(r.seed, r.links) for r in rows}:
        same = {r.method: r for r in rows if r.seed == seed and r.links == links and r.latency_s}
        for name, (vs_base, vs_stale) in speedups({m: r.latency_s for m, r in same.items()}).items():
            same[name].speedup_vs_uncompressed, same[name].speedup_vs_distrifusion = vs_base, vs_stale
    bounds = {(r.method, r.seed): r.latency_s for r in rows if r.links == "bound" and r.latency_s}
    for r in rows:
        if r.links == "shaped" and r.latency_s and (r.method, r.seed) in bounds:
            r.latency_bound_s = bounds[(r.method, r.seed)]
            r.over_bound = r.latency_s / r.latency_bound_s


def print_table(rows: list[MethodResult], console: Console, title: str) -> None:
    t = Table(title=title)
    for col in ("method", "seed", "links", "latency s", f"vs {UNCOMPRESSED_BASELINE}", "vs distrifusion",
                "bound s", "x bound", "MB on wire", "ratio", "PSNR dB", "SSIM", "cls agree", "status"):
        t.add_column(col, justify="right" if col not in ("method", "status") else "left")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in rows:
        q = r.quality
        t.add_row(r.method, str(r.seed), r.links, f(r.latency_s, ".2f"), f(r.speedup_vs_uncompressed, ".2f") + "x",
                  f(r.speedup_vs_distrifusion, ".2f") + "x", f(r.latency_bound_s, ".2f"), f(r.over_bound, ".2f"),
                  f(r.bytes_on_wire and r.bytes_on_wire / 1e6, ".2f"),
                  f(r.compression_ratio, ".1f"), f(q.get("psnr_db"), ".1f"), f(q.get("ssim"), ".3f"),
                  f(q.get("agreement_with_reference"), ".2f"),
                  r.status if r.status == "ok" else escape(f"FAILED: {r.error}"))
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
    names = [f"{r.method}/s{r.seed}/{r.links}" for r in ok]
    lat = go.Figure(go.Bar(x=names, y=[r.latency_s for r in ok]), layout=dict(title="latency (s)"))
    parts = go.Figure(layout=dict(title="time per rank (s): compute / blocked on communication / codec", barmode="stack"))
    for label, attr in (("compute", "compute_s"), ("comm wait", "comm_wait_s"), ("codec", "codec_s")):
        parts.add_bar(x=names, y=[getattr(r, attr) for r in ok], name=label)
    wire = go.Figure(go.Bar(x=names, y=[r.bytes_on_wire / 1e6 for r in ok]), layout=dict(title="MB on the wire (all ranks)"))
    html = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate((lat, parts, wire))]
    (results_dir / "plots.html").write_text("<html><body>" + "\n".join(html) + "</body></html>")


@contextlib.contextmanager
def link_pass(scenario: Scenario, name: str, backend, console: Console, results: Path) -> Iterator:
    """Yield a function job_file -> rank commands for this pass, with its cluster up (if any)."""
    world = scenario.world_size
    if name == "loopback":
        yield lambda job: local_torchrun(job, world)
        return
    links = scenario.directed_links(unlimited_rate=(name == "bound"))
    with EmulatedCluster(world, links, backend, log=console.print) as cluster:
        if name == "shaped":
            probes = [probe_link(cluster, s, d, spec) for (s, d), spec in sorted(links.items())]
            (results / "links.json").write_text(json.dumps(
                [asdict(p) | {"rate_error": p.rate_error} for p in probes], indent=1))
            t = Table(title="link probes (measured before the run)")
            for col in ("link", "configured", "wire Mbit/s", "rate error", "RTT ms", "configured RTT ms"):
                t.add_column(col, justify="right")
            for p, ((s, d), spec) in zip(probes, sorted(links.items())):
                t.add_row(f"{s}->{d}", spec.describe(), f"{p.wire_mbit:.1f}",
                          "-" if p.rate_error is None else f"{p.rate_error:+.1%}", f"{p.rtt_ms:.2f}",
                          f"{p.configured_rtt_ms:.2f}")
            console.print(t)
        prefixes = [cluster.prefix(k) for k in range(world)]
        yield lambda job: node_torchrun(job, world, prefixes, cluster.address(0), NODE_IF)


def run_scenario(scenario: Scenario, output: Path, console: Console, backend: str = "auto",
                 shaping: bool = True, bound: bool = True) -> tuple[Path, list[MethodResult]]:
    """Run every (link pass, seed, method); failures are recorded and the remaining runs still happen."""
    from ..runtime.quality import compare

    check = check_backend() if shaping else None
    if check is not None and check.backend is None:
        console.print(f"[yellow]link emulation unavailable:[/] {check.reason}. Running unshaped on loopback: "
                      f"latencies do not reflect the scenario's links.")
    emulate = check is not None and check.backend is not None
    passes = (["shaped", "bound"] if bound else ["shaped"]) if emulate else ["loopback"]
    link_mode = f"emulated ({check.backend}: {check.reason})" if emulate else "loopback (unshaped)"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    results = output / stamp
    results.mkdir(parents=True, exist_ok=False)
    (results / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json"), sort_keys=False))
    (results / "environment.json").write_text(json.dumps(environment(link_mode), indent=1))
    console.print(f"[bold]{scenario.name}[/]: {scenario.world_size} ranks, {len(scenario.methods)} methods, "
                  f"{scenario.steps} steps; links: {link_mode}; passes: {', '.join(passes)} -> {results}")
    rows: list[MethodResult] = []
    refs = {}
    model = checked_model(scenario)
    for seed in scenario.seeds:
        refs[seed] = reference_images(model, scenario, seed)
        (results / "reference").mkdir(exist_ok=True)
        np.save(results / "reference" / f"seed{seed}.npy", refs[seed][0])
        console.print(f"single-process reference (seed {seed}): {refs[seed][1]:.2f} s")
    meta = dict(scenario=scenario.name, link_mode=link_mode, passes=passes,
                reference_latency_s={s: r[1] for s, r in refs.items()}, reference_threads=REFERENCE_THREADS)
    for pass_name in passes:
        with link_pass(scenario, pass_name, check.backend if emulate else None, console, results) as commands, \
                Progress(TextColumn("{task.description:<34}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                         TimeElapsedColumn(), console=console) as progress:
            for seed in scenario.seeds:
                ref, _ = refs[seed]
                for method in scenario.methods:
                    run_dir = results / pass_name / method.name / f"seed{seed}"
                    run_dir.mkdir(parents=True)
                    job = Job(scenario=scenario, method=method, seed=seed, out_dir=str(run_dir.resolve()),
                              backend=backend)
                    job_file = run_dir / "job.json"
                    job_file.write_text(job.model_dump_json(indent=1))
                    task = progress.add_task(f"{pass_name}: {method.name}", total=scenario.steps)
                    try:
                        run_ranks(commands(job_file), run_dir, timeout_s=scenario.timeout_s * 4 + 60,
                                  on_step=lambda k, n, task=task: progress.update(task, completed=k))
                        row = collect(run_dir, method, seed)
                        row.links = pass_name
                        row.quality = compare(np.load(run_dir / "images.npy"), ref, scenario.conditions, model.classifier)
                    except RunFailed as e:
                        row = MethodResult(method=method.name, seed=seed, links=pass_name, status="failed", error=str(e))
                        progress.update(task, description=f"{pass_name}: {method.name} [red]failed")
                    rows.append(row)
                    add_speedups(rows)
                    write_summary(results, rows, meta)
    write_plots(results, rows)
    print_table(rows, console, f"{scenario.name}: {link_mode}")
    console.print(f"results: {results}")
    return results, rows
