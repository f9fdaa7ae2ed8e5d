"""Gloo hop micro-benchmark on emulated links: what the links alone cost, for the simulator's calibration.

Whole runs mix link time with compute imbalance (a rank blocked on a peer that is still computing). This
measures what the collectives alone cost: P ranks in an emulated cluster issue ``all_gather_into_tensor`` (what
ring attention's all-gather rotater, patch parallel and the output gather issue; gloo runs it as a ring of
P-1 hops) for messages from kilobytes to megabytes, over a grid of links (rate, delay, jitter, loss).
Calls run back to back, as a run's layers issue them (a barrier before each call would drain the queues, which
runs never do); a row holds the median over
repetitions, averaged over ranks. The grid avoids the held-out links of ``simulator/campaign`` (30 Mbit/15 ms,
Wi-Fi, WAN) but not the 5G profile's (100 Mbit/10 ms, +-3 ms, 0.1%); whole runs take precedence in the hop fit,
so the shipped calibration does not fit on these rows.
A job's ``compute_s`` keeps each rank's core busy between calls, as a layer's compute does; ``barrier: true``
puts a barrier before each call.

    python -m compactbed.testbed.linkbench --out results/linkbench      # needs root (namespaces)

writes ``linkbench.csv``. ``scenario calibrate ... results/linkbench`` fits the hop model from it when no whole
runs are given; with runs, it reports how much slower the runs' communication is than these links alone.

TCP congestion control: every point runs under each algorithm given, in turn, in the same run, so their ratio is
honest on any host. With the calibration's own algorithm among them, ``--into CALIBRATION_FOLDER`` writes the
others' round-trip factors into it (``Calibration.rtt_factor_by_algorithm``):

    python -m compactbed.testbed.linkbench --grid latency --congestion-control bbr,cubic --out results/cc \
        --into simulator/data
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

from ..netem.profiles import LinkSpec

SIZES = (4_096, 32_768, 131_072, 524_288, 2_097_152)
MAX_CALL_S = 2.5            # skip sizes whose estimated all-gather takes longer on a link
WORKER = "compactbed.testbed.linkbench"
IDLE_SYSCTL = "net.ipv4.tcp_slow_start_after_idle"
FIELDS = ("world", "rate_mbit", "delay_ms", "jitter_ms", "loss_pct", "bytes", "hops", "reps", "seconds",
          "congestion_control", "slow_start_after_idle")
LATENCY_GRID = ((4, LinkSpec(rate_mbit=100, delay_ms=5)), (4, LinkSpec(rate_mbit=200, delay_ms=2)),
                (2, LinkSpec(rate_mbit=50, delay_ms=10)))
LATENCY_SIZES = (4_096, 32_768, 131_072)
# node-to-node paths of the shipped profiles whose round trips exceed the calibrated box (wan, 5g without its
# jitter and loss) and edge_4node's, for TCP's slow start after idle (net.ipv4.tcp_slow_start_after_idle)
IDLE_GRID = ((4, LinkSpec(rate_mbit=500, delay_ms=40)), (4, LinkSpec(rate_mbit=100, delay_ms=20)),
             (4, LinkSpec(rate_mbit=100, delay_ms=10)))
IDLE_SIZES = (32_768, 131_072, 524_288)


def grid(quick: bool = False) -> list[tuple[int, LinkSpec]]:
    """(world size, link) points: rates x delays for 2 and 4 ranks, then jitter and loss at a few of them."""
    L = LinkSpec
    base = [L(rate_mbit=r, delay_ms=d) for r, d in
            ((20, 2), (50, 5), (100, 1), (100, 10), (200, 3), (500, 20), (None, 5), (40, 12))]
    impaired = [L(rate_mbit=150, delay_ms=4, jitter_ms=2), L(rate_mbit=100, delay_ms=10, jitter_ms=3),
                L(rate_mbit=100, delay_ms=5, loss_pct=0.5), L(rate_mbit=150, delay_ms=4, loss_pct=0.2),
                L(rate_mbit=100, delay_ms=10, jitter_ms=3, loss_pct=0.1), L(rate_mbit=50, delay_ms=5, loss_pct=1.0)]
    # fast lossy links: loss turns segmentation offloads off, so the links active at once share the host's
    # per-packet forwarding (calibration.forwarding_s_per_byte): 1.0x at 100 Mbit, up to 2.4x at 300 Mbit for 2 MB
    combined = [L(rate_mbit=150, delay_ms=4, jitter_ms=2, loss_pct=0.2),
                L(rate_mbit=300, delay_ms=2, jitter_ms=1, loss_pct=0.1),
                L(rate_mbit=100, delay_ms=5, jitter_ms=2, loss_pct=0.5),
                L(rate_mbit=250, delay_ms=6, jitter_ms=4, loss_pct=0.05)]
    points = [(w, s) for s in base + impaired + combined for w in (2, 4)]
    return points[::3] if quick else points


def estimate_call_s(world: int, spec: LinkSpec, nbytes: int) -> float:
    rate = (spec.rate_mbit or 10_000) * 1e6 / 8
    return (world - 1) * (2 * (spec.delay_ms + spec.jitter_ms) / 1e3 + nbytes / rate) * (1 + 50 * spec.loss_pct / 100)


# --- one rank (started by torchrun inside a node namespace) -------------------------------------------------
def busy(seconds: float) -> None:
    """Keep this rank's core busy with matrix products for ``seconds`` (a layer's compute)."""
    import torch

    a = torch.randn(256, 256)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a = torch.tanh(a @ a)


def worker(job_file: Path) -> None:
    import torch
    import torch.distributed as dist

    job = json.loads(job_file.read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=job["timeout_s"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for nbytes, reps in job["sizes"]:
        x = torch.full((nbytes,), rank, dtype=torch.uint8)
        out = torch.empty(nbytes * world, dtype=torch.uint8)
        dist.all_gather_into_tensor(out, x)                      # connections warm, buffers allocated
        dist.barrier()
        times = []
        for _ in range(reps):
            if job.get("barrier", False):
                dist.barrier()
            if job.get("compute_s"):                              # a layer's compute between collectives
                busy(job["compute_s"])
            t0 = time.perf_counter()
            dist.all_gather_into_tensor(out, x)
            times.append(time.perf_counter() - t0)
        if not all((out[i * nbytes:(i + 1) * nbytes] == i).all() for i in range(world)):
            raise RuntimeError(f"all-gather of {nbytes} bytes returned wrong data")
        rows.append(dict(bytes=nbytes, times=times))
    (job_file.parent / f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


# --- the driver ---------------------------------------------------------------------------------------------
def measure(world: int, spec: LinkSpec, run_dir: Path, backend, sizes=SIZES, congestion_control: str = "host",
            slow_start_after_idle: str = "host", compute_s: float = 0.0) -> list[dict]:
    """Bring up a cluster with ``spec`` on every link (each on its own) under ``congestion_control`` (and
    ``slow_start_after_idle`` 0 or 1 in every node; "host": the kernel's default), run the workers with
    ``compute_s`` of busy compute before each call, return one row per message size."""
    from ..netem.cluster import EmulatedCluster
    from ..netem.commands import NODE_IF
    from .launch import node_torchrun, run_ranks

    plan = []
    for n in sizes:
        est = estimate_call_s(world, spec, n)
        if est <= MAX_CALL_S:
            plan.append((n, max(3, min(12, int(4.0 / max(est, 1e-3))))))
    run_dir.mkdir(parents=True, exist_ok=True)
    job = run_dir / "job.json"
    job.write_text(json.dumps(dict(sizes=plan, timeout_s=60, compute_s=compute_s)))
    links = {(i, j): spec for i in range(world) for j in range(world) if i != j}
    with EmulatedCluster(world, links, backend, congestion_control=congestion_control) as cluster:
        in_force = cluster.congestion["in_force"]
        idle = cluster.set_sysctl(IDLE_SYSCTL, slow_start_after_idle) if slow_start_after_idle != "host" else \
            cluster.sysctl(IDLE_SYSCTL)
        prefixes = [cluster.prefix(k) for k in range(world)]
        run_ranks(node_torchrun(job, world, prefixes, cluster.address(0), NODE_IF, module=WORKER),
                  run_dir, timeout_s=300)
    per_rank = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for i, (n, reps) in enumerate(plan):
        medians = [statistics.median(ranks[i]["times"]) for ranks in per_rank]
        rows.append(dict(world=world, rate_mbit=spec.rate_mbit or 0, delay_ms=spec.delay_ms, jitter_ms=spec.jitter_ms,
                         loss_pct=spec.loss_pct, bytes=n, hops=world - 1, reps=reps,
                         seconds=sum(medians) / len(medians), congestion_control=in_force,
                         slow_start_after_idle=idle))
    return rows


def run(out: Path, quick: bool = False, log=print, latency: bool = False, algorithms: tuple[str, ...] = ("host",),
        idle: tuple[str, ...] | None = None) -> Path:
    """Measure the grid (``latency``: a few latency-bound points; ``idle``: the slow-start-after-idle points under
    each of these settings, 20 ms of compute before each call) under each algorithm into ``out/linkbench.csv``
    (rows are appended as each point finishes)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..netem.cluster import check_backend

    check = check_backend()
    if check.backend is None:
        raise RuntimeError(f"link emulation unavailable: {check.reason}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "linkbench.csv"
    settings = idle or ("host",)
    points = [(w, s, a, i) for w, s in (IDLE_GRID if idle else LATENCY_GRID if latency else grid(quick))
              for a in algorithms for i in settings]
    sizes = IDLE_SIZES if idle else LATENCY_SIZES if latency else SIZES
    with open(path, "w", newline="") as f, Progress(TextColumn("{task.description:<52}"), BarColumn(),
                                                     TextColumn("{task.completed}/{task.total}"),
                                                     TimeElapsedColumn()) as progress:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        task = progress.add_task("link points", total=len(points))
        for k, (world, spec, algorithm, setting) in enumerate(points):
            progress.update(task, description=f"{world} ranks, {spec.describe()}, {algorithm}")
            for row in measure(world, spec, out / "runs" / f"p{k:02d}", check.backend, sizes, algorithm, setting,
                               compute_s=0.02 if idle else 0.0):
                w.writerow(row)
            f.flush()
            progress.advance(task)
    log(f"{len(points)} link points ({check.backend} backend) -> {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0].endswith(".json"):       # torchrun worker
        worker(Path(argv[0]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("results/linkbench"))
    ap.add_argument("--quick", action="store_true", help="every third point of the grid")
    ap.add_argument("--grid", choices=["full", "latency"], default="full",
                    help=f"latency: {len(LATENCY_GRID)} latency-bound points, small messages")
    ap.add_argument("--slow-start-after-idle", metavar="0,1",
                    help=f"instead of the grid, {len(IDLE_GRID)} long-round-trip points under each of these settings "
                         f"of net.ipv4.tcp_slow_start_after_idle in the nodes")
    ap.add_argument("--congestion-control", default="host",
                    help="comma-separated TCP algorithms, each measured at every point (default: the host's)")
    ap.add_argument("--into", type=Path, help="a calibration folder: write the algorithms' round-trip factors into it")
    a = ap.parse_args(argv)
    path = run(a.out, a.quick, latency=a.grid == "latency", algorithms=tuple(a.congestion_control.split(",")),
               idle=tuple(a.slow_start_after_idle.split(",")) if a.slow_start_after_idle else None)
    if a.into:
        from ..simulator.costs import Calibration
        from ..simulator.fit import rtt_factors
        from ..simulator.points import linkbench_points

        calib = Calibration.load(a.into)
        factors = rtt_factors(linkbench_points([path.parent], calib), calib)
        if not factors:
            raise SystemExit(f"no point measured under both {calib.congestion_control} (the calibration's) and "
                             f"another algorithm: nothing written")
        calib.rtt_factor_by_algorithm |= factors
        calib.rtt_sources = {k: v for k, v in calib.rtt_sources.items() if k not in factors}
        calib.save(a.into)
        print("round trips per hop against " + calib.congestion_control + ": " +
              ", ".join(f"{k} {v:.3f}x" for k, v in sorted(factors.items())) + f" -> {a.into}/calibration.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
