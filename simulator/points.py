"""Measured points for the calibration: rows read from results folders (step records, link probes, link
micro-benchmarks), codec timings measured now, earlier calibrations' rows, and the host's pace during a run.

Rows are plain dicts, one CSV per kind in a calibration folder: compute.csv (run, rank, step, layer), codec.csv
(codec, op, bytes), links.csv (one probed link), hops.csv (run, rank, step of a synchronous all-gather method).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..netem.profiles import LinkSpec
from ..runtime.records import RunRecord, StepRecord, read_run, read_steps
from ..scenarios.schema import MethodSpec, Scenario, parse_recorded
from .costs import Calibration, DeviceProfile, burst_of
from .model import cluster_of
from .runs import MeasuredRun, inferred_launch_jobs
from .workload import workload_of


def method_runs(results: list[Path]) -> Iterator[tuple[Path, Scenario, MethodSpec, RunRecord, list[StepRecord]]]:
    """(run directory, scenario, method, run record, step records) of every finished method run (one with a
    run.json) under the given results folders."""
    for root in results:
        for run_json in sorted(Path(root).rglob("run.json")):
            d = run_json.parent
            job = json.loads((d / "job.json").read_text())
            yield (d, parse_recorded(job["scenario"], str(d)), MethodSpec.model_validate(job["method"]),
                   read_run(d), read_steps(d))


def fits(scenario: Scenario, method: MethodSpec) -> bool:
    """A run the fitters take: one sequence-parallel group over every rank (not CFG parallel, not PipeFusion, whose
    layers and exchanges the fitted terms do not describe)."""
    return scenario.cfg_degree(method) == 1 and not method.pipelined


def compute_points(results: list[Path], cores: int) -> list[dict]:
    """One row per (run, rank, step, layer): the layer's shape and its measured compute, with the step's times,
    the run's place in its launch (``launch_job``, "" where not known) and whether its exchange is synchronous."""
    rows, inferred = [], {}
    for d, scenario, method, run, recs in method_runs(results):
        if not fits(scenario, method):
            continue
        launch_job = run.launch_job
        if launch_job is None:
            folder = d.parents[2]
            inferred.setdefault(folder, inferred_launch_jobs(folder))
            launch_job = inferred[folder].get("/".join(d.parts[-3:]))
        w = workload_of(scenario, method)
        world, full = run.world, w.batch * w.tokens
        codec = method.codec.compressor.kind if method.compressed else ""
        for r in recs:
            local = r.warmup == "local"
            for layer, s in r.layer_compute_s.items():
                rows.append(dict(run=str(d), rank=r.rank, step=r.step, layer=int(layer), world=world,
                                 tokens=full if local else w.local_tokens,
                                 kv_tokens=full, hidden=w.shape.hidden, share=max(1.0, world / cores),
                                 seconds=s, wall_s=r.wall_s, comm_wait_s=r.comm_wait_s, codec_s=r.codec_s,
                                 codec=codec if r.warmup is None else "", kv_bytes=w.kv_bytes(),
                                 layers=w.shape.layers, launch_job="" if launch_job is None else launch_job,
                                 synchronous=int(not method.stale_kv)))
    return rows


def is_local(p: dict) -> bool:
    """A compute row of a local warmup step (every rank runs the whole sequence)."""
    return p["tokens"] == p["kv_tokens"] and p["world"] > 1


def slowest(timings) -> dict:
    """The largest of the seconds given per key: (key, seconds) pairs -> {key: max seconds}."""
    out: dict = {}
    for key, s in timings:
        out[key] = max(out.get(key, 0.0), s)
    return out


def layer_pace(points: list[dict]) -> dict[tuple, float]:
    """Each synchronous step's layer as the exchange sees it: (run, step, layer) -> its slowest rank's compute."""
    return slowest(((p["run"], p["step"], p["layer"]), p["seconds"]) for p in points if not is_local(p))


def in_kept_processes(p: dict) -> bool:
    """A row of a run whose processes ran an earlier job of their launch (ranks kept across jobs)."""
    return isinstance(p.get("launch_job"), int) and p["launch_job"] > 0


def kept_local_steps(points: list[dict]) -> list[dict]:
    """From compute rows as measured, with their ``host_factor``: one row per run with one local warmup step in
    processes kept from an earlier job of its launch, then synchronous steps: the step's shape (``share``,
    ``tokens`` of the whole sequence, ``hidden``, ``layers``), the ``host_factor`` and the slowest rank's wall time
    of that step (``first_s``), of the next (``next_s``) and the median of the later ones (``later_s``)."""
    walls: dict[str, dict[int, float]] = {}
    local: dict[str, dict] = {}
    for p in points:
        if not (in_kept_processes(p) and p.get("synchronous") == 1):
            continue
        steps = walls.setdefault(p["run"], {})
        steps[p["step"]] = max(steps.get(p["step"], 0.0), p["wall_s"])
        if is_local(p):
            local.setdefault(p["run"], {})[p["step"]] = dict(
                run=p["run"], share=p["share"], tokens=p["tokens"], hidden=p["hidden"], layers=p["layers"],
                host_factor=float(p.get("host_factor") or 1.0))
    rows = []
    for run, steps in local.items():
        w = [walls[run][s] for s in sorted(walls[run])]
        if set(steps) == {0} and len(w) >= 3:          # one local step, then synchronous ones
            rows.append(steps[0] | dict(first_s=w[0], next_s=w[1], later_s=float(np.median(w[2:]))))
    return rows


def results_folder(run: str) -> str:
    """The results folder of a run directory (``<results>/<pass>/<method>/seed<k>``)."""
    return str(Path(run).parents[2])


DISTURBED = 1.25      # a reference generation this many times its run's fastest was disturbed, not the host's pace


def undisturbed(seconds: list[float]) -> float:
    """The median of the timings within :data:`DISTURBED` of the fastest: the same deterministic generation timed
    again, so one much slower (another process's work on the shared cores, e.g. the previous run's teardown) is
    left out instead of moving the median of two."""
    fastest = min(seconds)
    return float(np.median([s for s in seconds if s <= DISTURBED * fastest]))


def reference_pace(run: MeasuredRun, device: DeviceProfile) -> float | None:
    """How fast the host computed during a results folder's run: the undisturbed wall time (:func:`undisturbed`)
    of its single-process reference generations (timed on one thread, like each rank, before the distributed runs,
    with no links involved) over the modelled single-process compute of the same generation. None without
    reference timings on one thread (``reference_threads``)."""
    if not run.reference_latency_s or run.reference_threads != 1:
        return None
    return generation_pace(parse_recorded(run.scenario, run.folder), list(run.reference_latency_s.values()), device)


def generation_pace(scenario: Scenario, seconds: list[float], device: DeviceProfile) -> float:
    """Timings of the scenario's single-process reference generation on one thread (``testbed.run``'s), undisturbed
    (:func:`undisturbed`), over its modelled compute: a host's pace, which ``device.reference_pace`` is the
    calibration runs' median of."""
    w = workload_of(scenario, scenario.methods[0])
    n = w.batch * w.tokens
    modelled = w.steps * (w.shape.layers * device.layer_seconds(n, n, w.shape.hidden, 1.0) + device.step_overhead_s)
    return undisturbed(seconds) / modelled


def corun_factor(probe: dict | None) -> float | None:
    """How many times slower a rank computes with every rank of the run computing at once than alone: the median
    rank of the run's host probe (``testbed.hostprobe``); None without one."""
    if not probe or not probe.get("alone_s") or not probe.get("together_s"):
        return None
    return float(np.median(probe["together_s"])) / probe["alone_s"]


def exchange_floor(probe: dict | None) -> float | None:
    """Seconds one exchange adds beside computing ranks on the run's host, whatever the link: in the host probe's
    rounds, the forwards with a ring hop after every attention layer less those without, per hop (median round; at
    least 0). None without that part of the probe. (``held_prof_p``'s runs also timed a round to every peer, a third
    column, read by nothing: docs/VALIDATION.md.)"""
    if not probe or not probe.get("exchange_rounds") or not probe.get("exchanges"):
        return None
    return max(float(np.median([r[1] - r[0] for r in probe["exchange_rounds"]])), 0.0) / probe["exchanges"]


def host_factors(runs: list[MeasuredRun], device: DeviceProfile) -> dict[str, float]:
    """Each run's host speed relative to the calibration runs' median (1.2 = computed 20% slower):
    :func:`reference_pace` / ``device.reference_pace``, keyed by results folder. Runs without reference timings, or
    a profile without a reference pace, are left out (factor 1)."""
    if not device.reference_pace:
        return {}
    paces = {r.folder: reference_pace(r, device) for r in runs}
    return {f: p / device.reference_pace for f, p in paces.items() if p}


def codec_points(shapes: list[tuple[int, int]], reps: int = 5) -> list[dict]:
    """Measure the codecs now (1 thread, float32, fused CPU backend where available)."""
    import torch

    from ..kernels.bench import bench_shape
    from ..kernels.spec import CompressorSpec

    torch.set_num_threads(1)
    rows = []
    for n, c in shapes:
        for kind in ("1bit", "2bit", "lowrank", "sparse"):
            (r,) = bench_shape(n, c, torch.float32, torch.device("cpu"), "auto", reps, [CompressorSpec(kind=kind)])
            raw = n * c * 4
            rows.append(dict(codec=kind, op="encode", bytes=raw, seconds=raw / (r["encode_gbps"] * 1e9)))
            rows.append(dict(codec=kind, op="decode", bytes=raw, seconds=raw / (r["decode_gbps"] * 1e9)))
    return rows


def link_points(results: list[Path]) -> list[dict]:
    rows = []
    for root in results:
        for f in sorted(Path(root).rglob("links.json")):
            for p in json.loads(f.read_text()):
                rows.append(dict(source=str(f), src=p["src"], dst=p["dst"], configured_rate_mbit=p["configured_rate_mbit"],
                                 wire_mbit=p["wire_mbit"], rtt_ms=p["rtt_ms"], configured_rtt_ms=p["configured_rtt_ms"]))
    return rows


def hop_points(results: list[Path], calib: Calibration, judged_on: Scenario | None = None) -> list[dict]:
    """Per (run, rank, step) of synchronous all-gather methods: hops, RTT and bytes/rate sums vs the measured
    time blocked on communication; ``imbalance_s`` of that is waiting for slower ranks' compute (the model's
    compute is each layer's slowest rank, :func:`layer_pace`), not for the links. ``judged_on``: take the links
    from this scenario instead of each run's own (same node count)."""
    rows = []
    for d, sc, method, run, recs in method_runs(results):
        link_pass = d.parent.parent.name          # results/<stamp>/<pass>/<method>/seed<k>
        if not method.synchronous_gather or link_pass not in ("shaped", "bound") or not fits(sc, method):
            continue
        w = workload_of(sc, method)
        p = sc.world_size
        directed = (judged_on or sc).directed_links()
        links = [directed[i, (i + 1) % p] for i in range(p)]
        slow = max(links, key=lambda l: (l.delay_ms, -(l.rate_mbit or 1e9)))
        rate = None if link_pass == "bound" else calib.effective_rate_bytes(slow)
        rtt = 2 * (slow.delay_ms / 1e3 + calib.link_overhead_s)
        jitter, loss = slow.jitter_ms / 1e3, slow.loss_pct / 100
        layers = w.shape.layers
        forwarding = p if cluster_of(judged_on or sc).forwarding else 0
        pace = slowest(((r.step, k), s) for r in recs for k, s in r.layer_compute_s.items())
        for r in recs:
            if r.warmup == "local":
                continue
            warm = r.warmup == "sync"
            rows.append(dict(run=str(d), rank=r.rank, step=r.step, rtt_s=rtt, bidirectional=int(p == 2),
                             jitter_s=jitter, loss=loss, rate_bytes=rate or 0.0,
                             burst_bytes=burst_of(slow) if rate else 0, forwarding=forwarding,
                             oversubscription=calib.share(p) - 1,
                             kv_hops=layers * (p - 1), kv_bytes=w.kv_wire_bytes(warm),
                             out_hops=(p - 1) * bool(w.gather_bytes(r.step)), out_bytes=w.gather_bytes(r.step),
                             comm_wait_s=r.comm_wait_s,
                             imbalance_s=sum(pace[r.step, k] - s for k, s in r.layer_compute_s.items())))
    return rows


def linkbench_points(results: list[Path], calib: Calibration) -> list[dict]:
    """Hop rows from gloo micro-benchmarks (``linkbench.csv``, written by ``testbed.linkbench``): one all-gather of a message
    over P-1 ring hops on a link measured alone, in the same columns as :func:`hop_points`."""
    rows = []
    for root in results:
        for f in sorted(Path(root).rglob("linkbench.csv")):
            with open(f, newline="") as fh:
                for r in csv.DictReader(fh):
                    spec = LinkSpec(rate_mbit=float(r["rate_mbit"]) or None, delay_ms=float(r["delay_ms"]),
                                    jitter_ms=float(r["jitter_ms"]), loss_pct=float(r["loss_pct"]))
                    rows.append(dict(run=str(f), rank=-1, step=-1,
                                     rtt_s=2 * (spec.delay_ms / 1e3 + calib.link_overhead_s),
                                     bidirectional=int(int(r["world"]) == 2), jitter_s=spec.jitter_ms / 1e3,
                                     loss=spec.loss_pct / 100, rate_bytes=calib.effective_rate_bytes(spec) or 0.0,
                                     burst_bytes=burst_of(spec), forwarding=int(r["world"]) if spec.loss_pct else 0,
                                     oversubscription=calib.share(int(r["world"])) - 1,
                                     kv_hops=int(r["hops"]), kv_bytes=int(r["bytes"]), out_hops=0, out_bytes=0,
                                     comm_wait_s=float(r["seconds"]),
                                     congestion_control=r.get("congestion_control") or "host"))
    return rows


HOP_COLUMNS = ("rtt_s", "kv_hops", "kv_bytes", "out_hops", "out_bytes", "comm_wait_s", "imbalance_s", "bidirectional",
               "jitter_s", "loss", "rate_bytes", "burst_bytes", "forwarding", "oversubscription")


def read_csv(path: Path) -> list[dict]:
    """Rows of a calibration CSV with numbers as numbers."""
    def num(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    with open(path, newline="") as f:
        return [{k: num(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        w.writeheader()
        w.writerows(rows)


def earlier_points(results: list[Path], name: str, fresh: list[dict] = (), exclude: set[str] = frozenset()
                   ) -> list[dict]:
    """Rows of ``name`` (compute.csv, links.csv, hops.csv) from earlier calibration folders among ``results``: their
    measurements are reused without the raw runs; rows of runs (or probe files) also in ``fresh``, the rows just
    read from raw results, are left out so that nothing counts twice, and so are rows of the results folders in
    ``exclude``."""
    key = "source" if name == "links.csv" else "run"
    seen = {row[key] for row in fresh}

    def excluded(row) -> bool:
        return bool(exclude) and any(str(p) in exclude for p in Path(row[key]).parents)

    return [row for root in results for f in sorted(Path(root).glob(name))
            if (f.parent / "calibration.json").is_file() for row in read_csv(f)
            if row[key] not in seen and not excluded(row)]
