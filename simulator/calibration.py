"""Calibration: measured compute, codec and link costs, fitted with scikit-learn and stored as plain files.

``scenario calibrate RESULTS...`` reads results folders written by ``scenario run`` (plus, optionally, link
micro-benchmark folders of :mod:`.linkbench` and earlier calibration folders, whose compute and link rows are
reused) and writes a folder with
  compute.csv     one row per (run, rank, step, layer): tokens, kv tokens, hidden, ranks per core, seconds
  codec.csv       one row per (codec, op, bytes): seconds, measured now on this machine by the kernel bench
  links.csv       one row per probed link: configured and measured rate and RTT
  hops.csv        one row per (run, rank, step) of all-gather methods: hops, RTT, bytes/rate, time blocked
  calibration.json  the fitted coefficients (non-negative least squares) that the simulator uses
Compute per layer: s = share * (a + b * tokens*hidden^2 + c * tokens*kv_tokens*hidden), share = ranks per
core on the measured host (4 ranks on 2 cores share 2x), fitted on each synchronous layer's slowest rank (the
exchange waits for it), each run's timings divided by its host factor: the run's single-process reference
generation (one thread, timed before the distributed runs) against the calibration runs' median, both relative to
the model, so that the host's drift between sessions does not end up in the fit (:func:`fit_compute_on_host`).
A local warmup step ends when its slowest rank does (nothing synchronizes ranks inside it): its time is
f0 + f1 * (share - 1) times the modeled compute, fitted on the slowest rank's step time. Codec: s = a + b * raw
bytes per (codec, op), measured by the kernel bench, plus a fixed cost per call in a run (K and V apiece: stream
state, framing, dispatch), fitted on the runs' codec time.
Links: effective rate = configured rate x measured wire efficiency x payload fraction; extra one-way latency
from the probes' RTT minus the configured delays; one collective hop (gloo) costs
k_hop + k_rtt * RTT + k_bw * bytes / rate, the transfer term scaled by 1 + (k_bidir - 1) * bytes / (bytes + n_bidir)
when both directions of the link carry bulk data (a 2-rank ring: ACKs queue behind the reverse data, more so as a
longer transfer fills the shaper's queue), and the round trips by k_rtt2 where both directions carry the exchange
(the per-step records show a 2-rank ring's small-message hops at ~1.5 RTT and a 4-rank ring's at ~1.15; the cause,
TCP's acknowledgement timing on a connection used both ways, is a guess), fitted by bounded least squares
(scipy) on the measured time blocked on communication; jitter lengthens the round trip by ~k_j x jitter
each way (in-order release), loss caps the rate at C * MSS / (RTT sqrt(p)) with C fitted and costs k_loss
round trips per expected lost packet; a share k_burst of the shaper's burst passes at line rate. On the
emulation host, a cluster with a lossy link runs with segmentation offloads off, so every 1500-byte packet
crosses the host's forwarding path (veth, htb, iptables, the delay line) on its own: the links active at once
share a forwarding capacity, fitted as seconds per payload byte; a hop takes the longer of its link time and
its share of forwarding (the forwarding overlaps the round trips; on the nine calibration runs of session 3,
against adding the two: per-step error 11.3% vs 11.2%, lossy links 15.4% vs 15.6%, whole runs 4.9% vs 6.5%). When ranks
outnumber the host's cores, each hop also waits k_sched x (ranks per core - 1) to be scheduled.
The hop model is fitted on whole runs when there are any (their communication also pays for the emulation
host's CPU contention), else on link micro-benchmarks (``linkbench.csv``); with both, calibrate reports how
much slower the runs' communication is than the links alone. Where the inputs include results folders (not only
earlier calibration rows), the per-step fit is then refined so the simulator reproduces those runs' latencies
(:func:`refine_hops_on_runs`; leave-one-scenario-out error over 23 emulated scenarios: 8.6% vs 9.7%). That
refinement also fits what only whole runs show: a 2-rank ring's asynchronous transfers (DistriFusion's gathers,
overlapping compute) cost a fitted factor of a synchronous one's.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..netem.commands import burst_bytes
from ..netem.profiles import LinkSpec
from .runs import MeasuredRun, is_calibration, read_runs, write_runs

PAYLOAD_FRACTION = 1448 / 1514      # TCP payload per wire byte at MTU 1500
DATA_DIR = Path(__file__).with_name("data")


@dataclass
class DeviceProfile:
    """Compute coefficients of one device kind; ``cores`` > 0 means ranks on one host share that many cores."""

    a: float
    b: float
    c: float
    step_overhead_s: float = 0.0
    cores: int = 0
    local_step_factor: tuple[float, float] = (1.0, 0.0)     # a local warmup step (every rank, whole sequence, no
                                                            # communication) ends with its slowest rank: f0 + f1 *
                                                            # (share - 1) x the modeled compute
    hop_overhead_s: float | None = None                     # transport's fixed cost per hop (None: calibrated)
    codec: dict[str, tuple[float, float]] | None = None     # this device's codec costs (None: calibrated)
    codec_call_s: float = 0.0                               # in a run, each codec call (K and V apiece) also
                                                            # pays this (stream state, framing, dispatch)
    reference_pace: float | None = None                     # calibration runs' median single-process reference
                                                            # time / modelled (None: no host-speed scaling)

    def layer_seconds(self, tokens: int, kv_tokens: int, hidden: int, share: float) -> float:
        """One layer of ``tokens`` queries over ``kv_tokens`` keys with ``share`` ranks per core."""
        return share * (self.a + self.b * tokens * hidden ** 2 + self.c * tokens * kv_tokens * hidden)


@dataclass
class Calibration:
    devices: dict[str, DeviceProfile]
    codec: dict[str, tuple[float, float]]          # "1bit/encode" -> (a, b)
    link_efficiency: float = 1.0
    link_overhead_s: float = 0.0
    hop_rtt_factor: float = 1.0          # one collective hop:
    hop_bandwidth_factor: float = 1.0    #   s = k_hop + k_rtt * RTT + k_bw * bytes / rate * (the both-directions
    hop_overhead_s: float = 0.0          #       penalty below if both carry bulk data, as in a 2-rank ring)
    hop_bidirectional_factor: float = 1.0
    bidirectional_half_bytes: float = 0.0  # the both-directions penalty grows with the message: k_bidir - 1 of it at
                                         #   bytes / (bytes + this) (0: the whole penalty at any size)
    jitter_factor: float = 0.5           # in-order release under +-j jitter adds ~k_j * j to each one-way delay
    loss_constant: float = 1.22          # lossy rate: min(rate, C * MSS / (RTT sqrt(p))) (Mathis form, C fitted)
    burst_factor: float = 0.0            # share of the shaper's burst allowance a message passes at line rate
    loss_rtts: float = 0.0               # round trips each expected lost packet costs (recovery)
    forwarding_s_per_byte: float = 0.0   # emulation host, offloads off: links active at once share 1/this B/s
    oversubscribed_hop_s: float = 0.0    # per hop and per rank beyond one per core: waiting to be scheduled
    bidirectional_rtt_factor: float = 1.0  # a hop's round trips cost this x k_rtt when the link's two directions
                                         #   carry the exchange at once (a 2-rank ring, all-to-all pairs)
    async_transfer_factor: float = 1.0   # a 2-rank ring's asynchronous gathers (DistriFusion): transfers cost this x
                                         #   a synchronous gather's
    sources: list[str] = field(default_factory=list)

    # --- queries used by the model ------------------------------------------------------------------------
    def share(self, world: int, device: str = "cpu") -> float:
        d = self.devices[device]
        return max(1.0, world / d.cores) if d.cores else 1.0

    def layer_seconds(self, tokens: int, kv_tokens: int, hidden: int, share: float, device: str) -> float:
        if device not in self.devices:
            raise KeyError(f"no compute profile for device {device!r}; known: {', '.join(self.devices)}")
        return self.devices[device].layer_seconds(tokens, kv_tokens, hidden, share)

    def codec_kernel_seconds(self, kind: str, op: str, raw_bytes: float, device: str = "cpu") -> float:
        """What the kernel bench measures for one encode or decode of ``raw_bytes``."""
        table = self.devices[device].codec or self.codec
        a, b = table.get(f"{kind}/{op}", table.get(f"1bit/{op}", (0.0, 0.0)))
        return a + b * raw_bytes

    def codec_seconds(self, kind: str, op: str, raw_bytes: float, device: str = "cpu") -> float:
        """One encode or decode of a layer's K/V (``raw_bytes`` uncompressed) in a run: the kernels plus two calls'
        fixed cost (K and V)."""
        return self.codec_kernel_seconds(kind, op, raw_bytes, device) + 2 * self.devices[device].codec_call_s

    def hop_overhead(self, device: str = "cpu") -> float:
        d = self.devices[device].hop_overhead_s
        return self.hop_overhead_s if d is None else d

    def hop_params(self, device: str = "cpu") -> tuple[float, ...]:
        """The hop model's parameters (:data:`HOP_PARAMS` order) with ``device``'s fixed cost per hop."""
        return tuple(self.hop_overhead(device) if n == "hop_overhead_s" else getattr(self, n) for n in HOP_PARAMS)

    def effective_rate_bytes(self, spec: LinkSpec) -> float | None:
        if spec.rate_mbit is None:
            return None
        return spec.rate_mbit * 1e6 / 8 * self.link_efficiency * PAYLOAD_FRACTION

    # --- files --------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        data = asdict(self)
        (folder / "calibration.json").write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, folder: Path | None = None) -> "Calibration":
        folder = Path(folder) if folder else DATA_DIR
        path = folder / "calibration.json"
        if not path.is_file():
            raise FileNotFoundError(f"no calibration at {path}; build one with `scenario calibrate RESULTS...`")
        raw = json.loads(path.read_text())
        raw["devices"] = {k: DeviceProfile(**v) for k, v in raw["devices"].items()}
        for d in raw["devices"].values():
            if d.codec:
                d.codec = {k: tuple(v) for k, v in d.codec.items()}
            d.local_step_factor = tuple(d.local_step_factor)
        raw["codec"] = {k: tuple(v) for k, v in raw["codec"].items()}
        return cls(**raw)


# Paper's codec timings on L20 for one FLUX K/V shard (1088 tokens x 3072, bf16 = 6.68 MB): 1-bit compress
# 0.06 ms, decompress 0.02 ms; low-rank compress 0.93 ms. 2-bit and sparse: taken as 1-bit's (not published).
_SHARD = 1088 * 3072 * 2
L20_CODEC = {"1bit/encode": (0.0, 0.06e-3 / _SHARD), "1bit/decode": (0.0, 0.02e-3 / _SHARD),
             "2bit/encode": (0.0, 0.06e-3 / _SHARD), "2bit/decode": (0.0, 0.02e-3 / _SHARD),
             "lowrank/encode": (0.0, 0.93e-3 / _SHARD), "lowrank/decode": (0.0, 0.02e-3 / _SHARD),
             "sparse/encode": (0.0, 0.06e-3 / _SHARD), "sparse/decode": (0.0, 0.02e-3 / _SHARD)}


def l20_profile(single_gpu_s: float = 28.06, steps: int = 28) -> DeviceProfile:
    """A FLOP-proportional profile that reproduces the paper's single-GPU FLUX time (L20-class GPU), with the
    paper's codec timings and an NCCL-class fixed cost per hop (50 us) instead of this host's gloo one."""
    from .workload import FLUX_DEV

    tokens = 4096 + 512
    h = FLUX_DEV.hidden
    per_layer = single_gpu_s / steps / FLUX_DEV.layers
    linear, attention = 24 * tokens * h * h, 4 * tokens * tokens * h        # FLOPs per layer
    k = per_layer / (linear + attention)
    return DeviceProfile(a=0.0, b=24 * k, c=4 * k, step_overhead_s=0.0, cores=0, hop_overhead_s=50e-6,
                         codec=L20_CODEC)


# --- fitting ------------------------------------------------------------------------------------------------
def _runs(results: list[Path]):
    """(job, run.json, records) of every successful method run under the given results folders."""
    for root in results:
        for run_json in sorted(Path(root).rglob("run.json")):
            d = run_json.parent
            job = json.loads((d / "job.json").read_text())
            recs = [json.loads(line) for f in sorted(d.glob("rank*.jsonl")) for line in f.open()]
            yield d, job, json.loads(run_json.read_text()), recs


def compute_points(results: list[Path], cores: int) -> list[dict]:
    from ..testbed.scenario import MethodSpec, parse_scenario
    from .workload import workload_of

    rows = []
    for d, job, run, recs in _runs(results):
        w = workload_of(parse_scenario(job["scenario"], str(d)), MethodSpec.model_validate(job["method"]))
        world, full = run["world"], w.batch * w.tokens
        codec = w.method.codec.compressor.kind if w.method.compressed else ""
        for r in recs:
            local = r["warmup"] == "local"
            for layer, s in r["layer_compute_s"].items():
                rows.append(dict(run=str(d), rank=r["rank"], step=r["step"], layer=int(layer), world=world,
                                 tokens=full if local else w.local_tokens,
                                 kv_tokens=full, hidden=w.shape.hidden, share=max(1.0, world / cores),
                                 seconds=s, wall_s=r["wall_s"], comm_wait_s=r["comm_wait_s"], codec_s=r["codec_s"],
                                 codec=codec if r["warmup"] is None else "", kv_bytes=w.kv_bytes(),
                                 layers=w.shape.layers))
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
    """(f0, f1) of the local warmup step: slowest rank's step time / modeled compute = f0 + f1 * (share - 1), by
    non-negative least squares over the measured local steps (rows with tokens == kv_tokens, world > 1)."""
    from sklearn.linear_model import LinearRegression

    steps: dict[tuple, dict] = {}
    for p in points:
        if is_local(p):
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


def results_folder(run: str) -> str:
    """The results folder of a run directory (``<results>/<pass>/<method>/seed<k>``)."""
    return str(Path(run).parents[2])


def reference_pace(run: MeasuredRun, device: DeviceProfile) -> float | None:
    """How fast the host computed during a results folder's run: the median wall time of its single-process
    reference generations (timed on one thread, like each rank, before the distributed runs, with no links
    involved) over the modelled single-process compute of the same generation. None without reference timings on
    one thread (``reference_threads``)."""
    from ..testbed.scenario import parse_scenario
    from .workload import workload_of

    if not run.reference_latency_s or run.reference_threads != 1:
        return None
    scenario = parse_scenario(run.scenario, run.folder)
    w = workload_of(scenario, scenario.methods[0])
    n = w.batch * w.tokens
    modelled = w.steps * (w.shape.layers * device.layer_seconds(n, n, w.shape.hidden, 1.0) + device.step_overhead_s)
    return float(np.median(list(run.reference_latency_s.values()))) / modelled


def host_factors(runs: list[MeasuredRun], device: DeviceProfile) -> dict[str, float]:
    """Each run's host speed relative to the calibration runs' median (1.2 = computed 20% slower):
    :func:`reference_pace` / ``device.reference_pace``, keyed by results folder. Runs without reference timings, or
    a profile without a reference pace, are left out (factor 1)."""
    if not device.reference_pace:
        return {}
    paces = {r.folder: reference_pace(r, device) for r in runs}
    return {f: p / device.reference_pace for f, p in paces.items() if p}


def fit_compute_on_host(points: list[dict], cores: int, earlier_pace: float | None = None,
                        runs: list[MeasuredRun] = ()) -> tuple[DeviceProfile, list[dict]]:
    """:func:`fit_compute` on the layer timings divided by their run's host factor (:func:`host_factors`: the
    emulation host's speed drifts between sessions, and every run times a single-process reference generation).
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


def fit_codec_call(points: list[dict], calib: "Calibration", device: str = "cpu") -> float:
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


def link_points(results: list[Path]) -> list[dict]:
    rows = []
    for root in results:
        for f in sorted(Path(root).rglob("links.json")):
            for p in json.loads(f.read_text()):
                rows.append(dict(source=str(f), src=p["src"], dst=p["dst"], configured_rate_mbit=p["configured_rate_mbit"],
                                 wire_mbit=p["wire_mbit"], rtt_ms=p["rtt_ms"], configured_rtt_ms=p["configured_rtt_ms"]))
    return rows


def burst_of(spec: LinkSpec) -> int:
    """Bytes the emulator's shaper lets through at line rate after an idle period (its htb burst)."""
    return burst_bytes(spec.rate_mbit) if spec.rate_mbit else 0


def hop_points(results: list[Path], calib: "Calibration") -> list[dict]:
    """Per (run, rank, step) of synchronous all-gather methods: hops, RTT and bytes/rate sums vs the measured
    time blocked on communication; ``imbalance_s`` of that is waiting for slower ranks' compute (the model's
    compute is each layer's slowest rank, :func:`layer_pace`), not for the links."""
    from ..testbed.scenario import MethodSpec, parse_scenario
    from .predict import cluster_of
    from .workload import workload_of

    rows = []
    for d, job, run, recs in _runs(results):
        method = MethodSpec.model_validate(job["method"])
        link_pass = d.parent.parent.name          # results/<stamp>/<pass>/<method>/seed<k>
        if method.comm not in ("ring", "patch") or link_pass not in ("shaped", "bound"):
            continue
        sc = parse_scenario(job["scenario"], str(d))
        w = workload_of(sc, method)
        p = sc.world_size
        links = [sc.link_between(i, (i + 1) % p) for i in range(p)]
        slow = max(links, key=lambda l: (l.delay_ms, -(l.rate_mbit or 1e9)))
        rate = None if link_pass == "bound" else calib.effective_rate_bytes(slow)
        rtt = 2 * (slow.delay_ms / 1e3 + calib.link_overhead_s)
        jitter, loss = slow.jitter_ms / 1e3, slow.loss_pct / 100
        layers = w.shape.layers
        forwarding = p if cluster_of(sc).forwarding else 0
        pace = slowest(((r["step"], k), s) for r in recs for k, s in r["layer_compute_s"].items())
        for r in recs:
            if r["warmup"] == "local":
                continue
            warm = r["warmup"] == "sync"
            rows.append(dict(run=str(d), rank=r["rank"], step=r["step"], rtt_s=rtt, bidirectional=int(p == 2),
                             jitter_s=jitter, loss=loss, rate_bytes=rate or 0.0,
                             burst_bytes=burst_of(slow) if rate else 0, forwarding=forwarding,
                             oversubscription=calib.share(p) - 1,
                             kv_hops=layers * (p - 1), kv_bytes=w.kv_wire_bytes(warm),
                             out_hops=p - 1, out_bytes=w.output_bytes(), comm_wait_s=r["comm_wait_s"],
                             imbalance_s=sum(pace[r["step"], k] - s for k, s in r["layer_compute_s"].items())))
    return rows


def linkbench_points(results: list[Path], calib: "Calibration") -> list[dict]:
    """Hop rows from gloo micro-benchmarks (``linkbench.csv``, :mod:`.linkbench`): one all-gather of a message
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
                                     comm_wait_s=float(r["seconds"])))
    return rows


MSS = 1448


def hop_seconds(params, rtt, nbytes, rate, bidirectional=0, jitter=0.0, loss=0.0, burst=0.0, forwarding=0,
                oversubscription=0.0):
    """One gloo hop: a handshake round trip (k_rtt of them; k_rtt x k_rtt2 where both directions of the link carry
    the exchange, as in a 2-rank ring; jitter lengthens it: release is in order), the transfer at the link rate of
    what exceeds the shaper's burst allowance or, with loss, at most C * MSS / (RTT sqrt(p)); slower when the reverse
    direction carries bulk data too (its ACKs queue behind it); each expected lost packet costs k_loss round trips;
    plus a fixed cost. ``forwarding`` > 0: this many links are active at once on the emulation host's per-packet
    path and share its capacity (1 / k_fwd bytes/s); that work overlaps the round trips, so the hop takes the longer
    of the two. ``oversubscription``: ranks per core beyond one on the host (share - 1); each hop then waits k_sched x
    that to be scheduled. Array-friendly."""
    k_rtt, k_bw, k_hop, k_bidir, n_bidir, k_jit, c_loss, k_burst, k_loss, k_fwd, k_sched, k_rtt2 = params
    rtt = np.asarray(rtt, float) + 2 * k_jit * np.asarray(jitter, float)
    loss = np.asarray(loss, float)
    rate = np.asarray(rate, float)
    nbytes = np.asarray(nbytes, float)
    lossy = c_loss * MSS / (np.maximum(rtt, 1e-4) * np.sqrt(np.maximum(loss, 1e-12)))
    eff = np.where(loss > 0, np.where(rate > 0, np.minimum(rate, lossy), lossy), rate)
    shaped = np.where(rate > 0, np.maximum(nbytes - k_burst * np.asarray(burst, float), 0.0), nbytes)
    transfer = np.where(eff > 0, shaped / np.where(eff > 0, eff, 1.0), 0.0)
    retransmits = k_loss * loss * (nbytes / MSS + 2) * rtt
    both = 1 + (k_bidir - 1) * nbytes / np.maximum(nbytes + n_bidir, 1e-9)
    link = k_rtt * np.where(bidirectional, k_rtt2, 1.0) * rtt + \
        k_bw * transfer * np.where(bidirectional, both, 1.0) + retransmits
    return k_hop + k_sched * np.asarray(oversubscription, float) + \
        np.maximum(link, nbytes * k_fwd * np.asarray(forwarding, float))


HOP_PARAMS = ("hop_rtt_factor", "hop_bandwidth_factor", "hop_overhead_s", "hop_bidirectional_factor",
              "bidirectional_half_bytes", "jitter_factor", "loss_constant", "burst_factor", "loss_rtts",
              "forwarding_s_per_byte", "oversubscribed_hop_s", "bidirectional_rtt_factor")
HOP_START = (1.0, 1.0, 0.001, 1.0, 1e5, 0.5, 1.22, 0.0, 0.0, 0.0, 0.0, 1.0)  # also the terms the data cannot identify
HOP_LOWER = (0, 0, 0, 1, 0, 0, 0.3, 0, 0, 0, 0, 0.3)
HOP_UPPER = (10, 10, 1, 10, 1e8, 3, 1e3, 1, 100, 1e-6, 1, 5)   # C up to 1e3: the cap may fit as not binding
HOP_SCALE = (1, 1, 1e-3, 1, 1e5, 1, 1, 1, 1, 1e-8, 1e-3, 1)
HOP_FIT_START = dict(forwarding_s_per_byte=1 / 50e6, oversubscribed_hop_s=0.001)  # forwarding: 50 MB/s shared


ASYNC_PARAMS = ("async_transfer_factor",)    # identified by whole runs of DistriFusion only
ASYNC_START, ASYNC_LOWER, ASYNC_UPPER, ASYNC_SCALE = (1.0,), (0.3,), (2.0,), (1.0,)


HOP_COLUMNS = ("rtt_s", "kv_hops", "kv_bytes", "out_hops", "out_bytes", "comm_wait_s", "imbalance_s", "bidirectional",
               "jitter_s", "loss", "rate_bytes", "burst_bytes", "forwarding", "oversubscription")


def _columns(points: list[dict]) -> dict[str, np.ndarray]:
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

    col = _columns(points)
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
    col = _columns(points)
    return [True] * 4 + [bool(col[k].any()) for k in ("bidirectional", "jitter_s", "loss", "burst_bytes", "loss",
                                                      "forwarding", "oversubscription", "bidirectional")]


def refine_hops_on_runs(results: list, calib: "Calibration", free: list[bool] | None = None) -> int:
    """Refine the hop parameters (in place) so that the simulator reproduces the measured runs' latencies:
    bounded least squares (scipy) of each (scenario, link pass, method)'s relative error, median over its seeds,
    starting from the per-step fit. The per-step fit sees the time blocked on communication alone; whole runs
    also show how compute and communication combine in a step, the compute fit's errors included. ``free``:
    which of :data:`HOP_PARAMS` may move (default: all). ``results``: paths or measured runs (:func:`.runs.read_runs`).
    Returns the number of cases fitted (0: none, unchanged)."""
    from scipy.optimize import least_squares

    from .model import Simulator
    from .predict import measured_cases

    cases = measured_cases(results, calib=calib)
    if not cases:
        return 0
    free = list(free or [True] * len(HOP_PARAMS))
    free += [any(c.workload.method.comm == "distrifusion" for c in cases)] * len(ASYNC_PARAMS)
    names = [n for n, f in zip(HOP_PARAMS + ASYNC_PARAMS, free) if f]
    lo, hi, scale = (np.array([v for v, f in zip(vals, free) if f]) for vals in
                     (HOP_LOWER + ASYNC_LOWER, HOP_UPPER + ASYNC_UPPER, HOP_SCALE + ASYNC_SCALE))

    def residual(x):
        for n, v in zip(names, x):
            setattr(calib, n, float(v))
        return np.array([Simulator(c.workload, c.cluster, calib).run().latency_s / c.median_s - 1 for c in cases])

    x0 = np.clip([getattr(calib, n) for n in names], lo, hi)
    fit = least_squares(residual, x0=x0, x_scale=scale, bounds=(lo, hi), diff_step=1e-3)
    residual(fit.x)
    return len(cases)


def _read_csv(path: Path) -> list[dict]:
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
            if (f.parent / "calibration.json").is_file() for row in _read_csv(f)
            if row[key] not in seen and not excluded(row)]


def _sources(results: list[Path], exclude: set[str] = frozenset()) -> list[str]:
    out = []
    for r in results:
        earlier = Path(r) / "calibration.json"
        out += json.loads(earlier.read_text()).get("sources", []) if earlier.is_file() else [str(r)]
    return [s for s in dict.fromkeys(out) if s not in exclude]


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        path.write_text("")
        return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        w.writeheader()
        w.writerows(rows)


def _inputs(results: list[Path], exclude: set[str]) -> list[Path]:
    """The calibration's inputs one by one: earlier calibration folders as given, every results folder (with
    summary.json) under the other paths, except those in ``exclude``; paths without any (link micro-benchmark
    folders) as given."""
    out = []
    for root in map(Path, results):
        found = [] if is_calibration(root) else sorted(s.parent for s in root.rglob("summary.json"))
        out += [f for f in found if str(f) not in exclude] if found else [root]
    return out


def _earlier_calibration(results: list[Path]) -> Calibration | None:
    """The first earlier calibration among ``results``."""
    return next((Calibration.load(Path(r)) for r in results if is_calibration(r)), None)


def calibrate(results: list[Path], out: Path, cores: int | None = None, log=print,
              codec_rows: list[dict] | None = None, exclude: set[str] = frozenset()) -> Calibration:
    """Fit a calibration from results folders (and earlier calibration folders) and write it, with its data points
    and measured runs, to ``out``. ``codec_rows``: codec timings to use (codec.csv rows) instead of measuring the
    kernels now. ``exclude``: results folders of earlier calibrations to leave out (rows and runs)."""
    cores = cores or os.cpu_count() or 1
    exclude = set(map(str, exclude))
    results = _inputs(results, exclude)
    runs = read_runs(results, exclude)
    cpoints = compute_points(results, cores)
    cpoints += earlier_points(results, "compute.csv", cpoints, exclude)
    if not cpoints:
        raise ValueError("no measured runs (run.json + rank*.jsonl) under " + ", ".join(map(str, results)))
    earlier = _earlier_calibration(results)
    earlier_cpu = earlier.devices.get("cpu") if earlier else None
    device, on_host = fit_compute_on_host(cpoints, cores, earlier_cpu.reference_pace if earlier_cpu else None, runs)
    cpoints = [p | {"host_factor": q["host_factor"]} for p, q in zip(cpoints, on_host)]
    # per-step time outside the layers (embeddings, final layer, sampler update), from the same records
    step_rows = {}
    for p in on_host:
        step_rows.setdefault((p["run"], p["rank"], p["step"]), []).append(p)
    residual = [max(0.0, ps[0]["wall_s"] - sum(q["seconds"] for q in ps) - ps[0]["comm_wait_s"] - ps[0]["codec_s"])
                for ps in step_rows.values()]
    device.step_overhead_s = float(np.median(residual))
    device.local_step_factor = fit_local_step(on_host, device)
    shapes = sorted({(p["tokens"], p["hidden"]) for p in cpoints})
    kpoints = codec_rows if codec_rows is not None else \
        codec_points([(max(8, t), h) for t, h in shapes[:: max(1, len(shapes) // 6)]])
    lpoints = link_points(results)
    lpoints += earlier_points(results, "links.csv", lpoints, exclude)
    shaped = [p for p in lpoints if p["configured_rate_mbit"]]
    efficiency = float(np.mean([p["wire_mbit"] / p["configured_rate_mbit"] for p in shaped])) if shaped else 1.0
    overhead = float(np.mean([(p["rtt_ms"] - p["configured_rtt_ms"]) / 2 / 1e3 for p in lpoints])) if lpoints else 0.0
    # "l20": not measured here; anchored to the paper's single-GPU FLUX time and codec timings, for GPU what-ifs
    calib = Calibration(devices={"cpu": device, "l20": l20_profile()}, codec=fit_codec(kpoints), link_efficiency=efficiency,
                        link_overhead_s=max(0.0, overhead), sources=_sources(results, exclude))
    if earlier:     # whole runs of DistriFusion refit it below; without any, an earlier calibration's value stays
        for name in ASYNC_PARAMS:
            setattr(calib, name, getattr(earlier, name))
    device.codec_call_s = fit_codec_call(cpoints, calib)
    hpoints = hop_points(results, calib)
    hpoints += earlier_points(results, "hops.csv", hpoints, exclude)
    bench = linkbench_points(results, calib)
    # Whole runs when there are any: on an emulation host their communication also pays for CPU contention
    # (ranks and the delay line share the cores), which links measured alone (micro-benchmarks) do not show.
    if hpoints or bench:
        for name, value in zip(HOP_PARAMS, fit_hops(hpoints or bench)):
            setattr(calib, name, value)
    if hpoints:
        fitted = refine_hops_on_runs(runs, calib, identified(hpoints))
        if fitted:
            log(f"hop model refined on {fitted} whole runs (their latency, median over seeds)")
    if hpoints and bench:
        col = _columns(hpoints)
        ratio = np.median((col["comm_wait_s"] - col["imbalance_s"]) / np.maximum(comm_seconds(fit_hops(bench), col), 1e-9))
        log(f"the runs' time blocked on communication is {ratio:.2f}x (median) what the links alone cost "
            f"(fitted on {len(bench)} micro-benchmark points); the hop model is fitted on the runs")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "hops.csv", hpoints)
    _write_csv(out / "compute.csv", cpoints)
    _write_csv(out / "codec.csv", kpoints)
    _write_csv(out / "links.csv", lpoints)
    write_runs(out, runs)
    calib.save(out)
    log(f"calibrated from {len(cpoints)} layer timings, {len(kpoints)} codec timings, {len(lpoints)} link probes, "
        f"hops fitted on {f'{len(hpoints)} run steps' if hpoints else f'{len(bench)} micro-benchmark points'} -> {out}")
    return calib
