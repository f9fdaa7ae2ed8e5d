"""GPU clusters: one generation as xDiT runs it on NCCL, simulated in SimPy from the layered cost model.

Layers of the model, each with its own data and code:
  workload      :mod:`.workload`: tokens, FLOPs and bytes of a layer for a model shape and method
  device        a layer's time on a GPU (:func:`layer_seconds`): its linear FLOPs at the device's anchored
                efficiency of its datasheet peak (or reading its weights from HBM, if slower), plus attention FLOPs
  interconnect  :mod:`.hardware` link classes, in nccl-tests' terms
  collectives   :mod:`.collectives`: NCCL's ring all-gather, all-to-all and send/recv over the machines' fabric
  codec         a memory-bound pass: the paper's L20 kernel timings, scaled by the device's HBM bandwidth

What overlaps is simulated: ring attention's K/V rotation (xDiT's ring flash attention) runs each hop beside the
attention over the block at hand; a direct exchange beside the own block; DistriFusion's all-gathers beside the
next layers and step. Each machine's NIC and its GPU fabric are SimPy resources a transfer holds, so an
asynchronous gather and the next exchange contend. Ranks run in lockstep, each phase as long as its slowest rank.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import math

import simpy

from ..scenarios.schema import HardwareSpec, Scenario, ScenarioError
from . import cfg, pipefusion, stages
from .collectives import Fabric, allgather_seconds, alltoall_seconds, sendrecv_seconds
from .hardware import Anchor, DeviceSpec, shipped
from .model import Prediction
from .workload import SHAPES, Workload, image_tokens

# The paper's codec timings on an L20 for one FLUX K/V shard (1088 tokens x 3072, bf16 = 6.68 MB): 1-bit compress
# 0.06 ms, decompress 0.02 ms; low-rank compress 0.93 ms (2-bit and sparse taken as 1-bit's: not published).
CODEC_REFERENCE = {"device": "l20", "shard_bytes": 1088 * 3072 * 2,
                   "seconds": {"encode": 0.06e-3, "decode": 0.02e-3, "lowrank/encode": 0.93e-3}}
# xDiT's blockwise attention (yunchang's ring flash attention, also on a ring of one under Ulysses) keeps the output
# in fp32 and merges each further block's by log-sum-exp (update_out_and_lse, fused by TorchScript on CUDA): bytes
# per output element of the first block's cast up, each merge (read the running output and the block's, write it
# back) and the cast down, for activations of ``a`` bytes.
MERGE_BYTES = {"cast_up": lambda a: a + 4, "merge": lambda a: 4 + a + 4, "cast_down": lambda a: 4 + a}
# Patch parallel and DistriFusion gather every rank's K/V shard and attend once over their concatenation
# (CompactFusion's patch_gather_fwd: torch.cat of the shards; DistriFusion first clones each stale shard and the
# fresh own one): memory passes, in shards of K+V read and written, for P ranks.
GATHER_COPIES = {"concat": lambda p: 2 * p, "stale": lambda p: 2 * p + 2 * (p + 1)}
DEFAULT_EFFICIENCY_NOTE = "median of the anchored devices (no published single-device time for this device)"


def layer_flops(tokens: float, kv_tokens: float, hidden: int) -> tuple[float, float]:
    """(linear, attention) FLOPs of one DiT block: QKV, output and a 4x MLP (12 h^2 weights, 2 FLOPs per weight
    and token), and QK^T plus AV."""
    return 24 * tokens * hidden ** 2, 4 * tokens * kv_tokens * hidden


TILE = 128          # output tile of a tensor-core GEMM / flash-attention block (CUTLASS's default 128x128 for bf16)


def waves(dev: DeviceSpec, blocks: int) -> float:
    """The share of the SMs a kernel of ``blocks`` thread blocks keeps busy over its waves (wave quantization)."""
    if not dev.sms or blocks <= 0:
        return 1.0
    return blocks / (math.ceil(blocks / dev.sms) * dev.sms)


def layer_seconds(dev: DeviceSpec, efficiency: float, tokens: float, kv_tokens: float, hidden: int,
                  heads: int = 1, act_bytes: int = 2, cross_tokens: int = 0) -> float:
    """One DiT block on ``tokens`` queries over ``kv_tokens`` keys: its four GEMMs (QKV, output, MLP up and
    down: N = 3h, h, 4h, h) and attention at ``efficiency`` of the peak, each kernel slowed by its last partial wave
    of 128x128 tiles (attention: 128-query blocks per head); a GEMM reads its weights from HBM at least. With
    ``cross_tokens`` (PixArt) also a cross-attention to that many text tokens: its query and output GEMMs and its
    attention (the text's own K/V projections, a few percent, left out)."""
    peak = dev.peak_tflops * 1e12 * efficiency
    m = math.ceil(tokens / TILE)
    gemms = [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]
    t = 0.0
    for n_out, k_in in gemms + [(hidden, hidden)] * (2 if cross_tokens else 0):
        flops = 2 * tokens * n_out * k_in
        t += max(flops / (peak * waves(dev, m * math.ceil(n_out / TILE))), n_out * k_in * act_bytes / (dev.hbm_gbs * 1e9))
    for keys in (kv_tokens, cross_tokens):
        if keys:
            t += 4 * tokens * keys * hidden / (peak * waves(dev, m * heads))
    return t


def anchor_tokens(anchor: Anchor) -> tuple[int, int]:
    """(tokens per sequence, batch) of an anchor's generation."""
    shape = SHAPES[anchor.model]
    return image_tokens(shape, anchor.resolution, anchor.frames, anchor.height) + shape.text_tokens, anchor.batch


@cache
def fit_efficiency(dev: DeviceSpec, anchor: Anchor) -> float:
    """The fraction of ``dev``'s peak at which :func:`layer_seconds` (and the stages outside the denoiser, where the
    anchor's time includes them) reproduces the anchor's single-device time."""
    shape = SHAPES[anchor.model]
    tokens, batch = anchor_tokens(anchor)
    lo, hi = 1e-4, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        t = anchor.steps * shape.layers * layer_seconds(dev, mid, batch * tokens, tokens, shape.hidden, shape.heads,
                                                        shape.act_bytes, shape.cross_tokens)
        if anchor.outside:
            t += stages.outside_seconds(dev, mid, anchor.model, anchor.height or anchor.resolution, anchor.resolution,
                                        anchor.frames, prompts=batch, outputs=int(anchor.decode))
        lo, hi = (lo, mid) if t < anchor.seconds else (mid, hi)
    return (lo + hi) / 2


@cache
def efficiency(dev: DeviceSpec, model: str) -> tuple[float, str]:
    """``dev``'s compute efficiency for ``model``: fitted to its published single-device time of that model (else
    of another model, else the median over the shipped devices that have one), and where it came from."""
    if dev.efficiency:
        return dev.efficiency, f"fitted to {len(dev.measured)} measured blocks (scenario profile)"
    same = [a for a in dev.anchors if a.model == model] or list(dev.anchors)
    if same:
        a = same[0]
        note = "" if a.model == model else f" (no {model} time published)"
        return fit_efficiency(dev, a), f"{a.seconds:g} s single-device {a.model}{note}: {a.source}"
    values = sorted(efficiency(d, model)[0] for d in shipped().devices.values() if d.anchors)
    return values[len(values) // 2], DEFAULT_EFFICIENCY_NOTE


def codec_seconds(dev: DeviceSpec, kind: str, op: str, raw_bytes: float) -> float:
    """One encode or decode of ``raw_bytes`` of K+V: as measured on the device (``scenario profile``), else a
    memory-bound pass: the reference timings scaled by HBM bandwidth."""
    measured = dict(dev.codec)
    if f"{kind}/{op}" in measured or f"1bit/{op}" in measured:
        return measured.get(f"{kind}/{op}", measured.get(f"1bit/{op}")) * raw_bytes
    ref = CODEC_REFERENCE
    secs = ref["seconds"].get(f"{kind}/{op}", ref["seconds"][op])
    hbm_ref = shipped().device(ref["device"]).hbm_gbs
    return secs * raw_bytes / ref["shard_bytes"] * hbm_ref / dev.hbm_gbs


@dataclass(frozen=True)
class GpuCluster:
    """Ranks on GPUs: each rank's device and compute scale, and the fabric joining them."""

    devices: tuple[DeviceSpec, ...]
    fabric: Fabric
    compute_scale: tuple[float, ...] = ()

    @property
    def world(self) -> int:
        return self.fabric.world

    def scale(self, r: int) -> float:
        return self.compute_scale[r] if self.compute_scale else 1.0

    def subset(self, ranks: list[int]) -> "GpuCluster":
        """The cluster of ``ranks`` alone, renumbered from 0 (machines and NICs as they were)."""
        f = self.fabric
        paths = None if f.paths is None else {(i, j): f.paths[(a, b)] for i, a in enumerate(ranks)
                                              for j, b in enumerate(ranks) if (a, b) in f.paths}
        return GpuCluster(tuple(self.devices[r] for r in ranks),
                          replace(f, machine=tuple(f.machine[r] for r in ranks), paths=paths),
                          tuple(self.compute_scale[r] for r in ranks) if self.compute_scale else ())


def gpu_cluster_of(scenario: Scenario, device: str | None = None, unlimited_rate: bool = False) -> GpuCluster:
    """The scenario's ``hardware`` (``device`` overrides its GPU; without the block: one ``device`` per machine
    behind the scenario's links). Paths between machines are the scenario's links where it sets any (the rate
    lifted for the bound pass)."""
    hw = scenario.hardware or HardwareSpec(device=device or "l20")
    if device:
        hw = hw.model_copy(update={"device": device})
    profiles, g, n = shipped(), hw.gpus_per_node, scenario.world_size
    try:
        devices = tuple(profiles.device(x.device or hw.device) for x in scenario.nodes)
        nics = tuple(profiles.link(scenario.nodes[m * g].nic or hw.inter_node, "nic") for m in range(-(-n // g)))
        intra = profiles.link(hw.intra_node, "intra")
    except KeyError as e:
        raise ScenarioError(f"{scenario.name}: hardware: {e.args[0]}") from None
    paths = scenario.directed_links(unlimited_rate) if scenario.sets_links or scenario.hardware is None else None
    fabric = Fabric(tuple(r // g for r in range(n)), intra, nics, paths)
    return GpuCluster(devices, fabric, tuple(x.compute_scale for x in scenario.nodes))


class GpuSimulator:
    """Predict one generation of ``workload`` on ``cluster``."""

    def __init__(self, workload: Workload, cluster: GpuCluster):
        if cluster.world != workload.world:
            raise ValueError(f"cluster has {cluster.world} ranks, workload {workload.world}")
        self.w, self.c = workload, cluster
        shape = workload.shape
        self.eff = [efficiency(d, shape.name if shape.name in SHAPES else "flux.1-dev")[0] for d in cluster.devices]
        self._compute: dict[tuple, float] = {}
        self._codec: dict[bool, tuple[float, float]] = {}

    # --- costs of one layer (slowest rank) --------------------------------------------------------------------
    def compute(self, tokens: float, kv_tokens: float) -> float:
        key = (tokens, kv_tokens)
        if key not in self._compute:
            self._compute[key] = self._compute_seconds(tokens, kv_tokens)
        return self._compute[key]

    def _compute_seconds(self, tokens: float, kv_tokens: float) -> float:
        w = self.w
        return max(layer_seconds(d, e, tokens, kv_tokens, w.shape.hidden, w.shape.heads, w.shape.act_bytes,
                                 w.shape.cross_tokens) * self.c.scale(r)
                   for r, (d, e) in enumerate(zip(self.c.devices, self.eff)))

    def linear(self, tokens: float) -> float:
        return self.compute(tokens, 0)

    def attention(self, tokens: float, kv_tokens: float) -> float:
        return self.compute(tokens, kv_tokens) - self.linear(tokens)

    def memory_pass(self, nbytes: float) -> float:
        """Seconds of moving ``nbytes`` through HBM, slowest rank."""
        return max(nbytes / (d.hbm_gbs * 1e9) * self.c.scale(r) for r, d in enumerate(self.c.devices))

    def merge(self, kind: str) -> float:
        """One pass of the blockwise attention's output (:data:`MERGE_BYTES`)."""
        w = self.w
        return self.memory_pass(w.local_tokens * w.shape.hidden * MERGE_BYTES[kind](w.shape.act_bytes))

    def gather_copies(self, kind: str) -> float:
        """The copies around a gathered attention (:data:`GATHER_COPIES`)."""
        return self.memory_pass(self.w.kv_bytes() * GATHER_COPIES[kind](self.w.world))

    def codec(self, warm: bool) -> tuple[float, float]:
        """(encode, decode) of one layer's K/V, slowest rank."""
        if warm not in self._codec:
            self._codec[warm] = self._codec_seconds(warm)
        return self._codec[warm]

    def _codec_seconds(self, warm: bool) -> tuple[float, float]:
        w = self.w
        if warm or not w.method.compressed:
            return 0.0, 0.0
        kind, raw = w.method.codec.compressor.kind, w.kv_bytes()
        return (max(codec_seconds(d, kind, "encode", raw) * self.c.scale(r) for r, d in enumerate(self.c.devices)),
                max(codec_seconds(d, kind, "decode", raw) * self.c.scale(r) for r, d in enumerate(self.c.devices)))

    def outside(self) -> float:
        """The text encoders and the VAE decode (:mod:`.stages`), slowest rank: every rank encodes every prompt and
        decodes every output."""
        w = self.w
        if w.output is None:
            return 0.0
        frames, height, width = w.output
        images = w.images or w.batch
        return max(stages.outside_seconds(d, e, w.shape.name, height, width, frames, w.batch // images,
                                          images if w.decode else 0)
                   * self.c.scale(r) for r, (d, e) in enumerate(zip(self.c.devices, self.eff)))

    # --- the event model --------------------------------------------------------------------------------------
    def run(self) -> Prediction:
        """The generation: the denoising loop, then the stages outside it (:meth:`outside`)."""
        p, extra = self.denoise(), self.outside()
        return replace(p, latency_s=p.latency_s + extra, compute_s=p.compute_s + extra)

    def denoise(self) -> Prediction:
        if self.w.cfg > 1:
            return self._cfg_run()
        if self.w.method.pipelined:
            return self._pipefusion_run()
        env = simpy.Environment()
        w, f, p, L = self.w, self.c.fabric, self.w.world, self.w.shape.layers
        machines = sorted(set(f.machine))
        nic = {m: simpy.Resource(env, 1) for m in machines}
        fabric = {m: simpy.Resource(env, 1) for m in machines}
        stats = dict(compute=0.0, comm=0.0, codec=0.0, bytes=0)
        everyone = list(range(p))
        T = w.tokens                                            # keys a query attends to (one sequence)
        t_local = w.local_tokens

        # every collective spans all ranks: it holds the NICs it crosses and every machine's fabric
        held = [nic[m] for m in f.nics_used(everyone)] + list(fabric.values())

        def transfer(seconds: float):
            """A collective of ``seconds``, holding the resources it uses."""
            reqs = [res.request() for res in held]
            yield env.all_of(reqs)
            yield env.timeout(seconds)
            for res, req in zip(held, reqs):
                res.release(req)

        def exposed(what, seconds_busy_elsewhere: float):
            """Wait for ``what`` (a transfer) while computing ``seconds_busy_elsewhere``; account what shows."""
            t0 = env.now
            yield env.all_of([env.process(what), env.timeout(seconds_busy_elsewhere)])
            stats["comm"] += max(0.0, env.now - t0 - seconds_busy_elsewhere)

        def ring_attention(payload: float, ranks_per_ring: int, decode: float, direct: bool):
            """Attention over ``ranks_per_ring`` K/V blocks: the own block, then each peer's block as it arrives
            (ring: P-1 hops, each beside the block at hand; direct: one round beside the own block)."""
            block = self.attention(t_local, T / ranks_per_ring) if ranks_per_ring else 0.0
            merge, casts = self.merge("merge"), self.merge("cast_up") + self.merge("cast_down")
            if w.degrees[0] * ranks_per_ring == 1:              # one GPU: the model's own attention, no merging
                casts = 0.0
            stats["compute"] += ranks_per_ring * block + (ranks_per_ring - 1) * merge + casts
            stats["codec"] += (ranks_per_ring - 1) * decode
            groups = _ring_groups(w, p)
            if direct:
                secs = max(alltoall_seconds(f, payload * len(g), g) for g in groups)
                yield from exposed(transfer(secs), block + casts)
                yield env.timeout((ranks_per_ring - 1) * (block + decode + merge))
                return
            pairs = [(g[i], g[(i + 1) % len(g)]) for g in groups for i in range(len(g))]
            hop = sendrecv_seconds(f, payload, pairs)
            for _ in range(ranks_per_ring - 1):
                yield from exposed(transfer(hop), block + decode + merge)
            yield env.timeout(block + casts)

        def layer(warm: bool, local: bool):
            """One block on every rank (lockstep)."""
            if local:                                           # local warmup: the whole sequence, no exchange
                t = self.compute(w.batch * T, T)
                yield env.timeout(t)
                stats["compute"] += t
                return
            enc, dec = self.codec(warm)
            payload = w.kv_wire_bytes(warm)
            lin = self.linear(t_local)
            yield env.timeout(lin + enc)
            stats["compute"] += lin
            stats["codec"] += enc
            u, r = w.degrees
            if w.method.all_to_all:
                if u > 1:
                    secs = max(alltoall_seconds(f, payload * 3 / 2, g) for g in _ulysses_groups(w, p))
                    yield from exposed(transfer(secs), 0.0)
                yield from ring_attention(payload / u, r, dec, direct=False)
                if u > 1:
                    secs = max(alltoall_seconds(f, payload / 2, g) for g in _ulysses_groups(w, p))
                    yield from exposed(transfer(secs), 0.0)
            elif w.method.own_attention_exchange and not w.method.stale_kv:     # patch: gather, then attend
                yield from exposed(transfer(allgather_seconds(f, payload, everyone)), 0.0)
                att = self.attention(t_local, T) + self.gather_copies("concat")
                yield env.timeout(att + (p - 1) * dec)
                stats["compute"] += att
                stats["codec"] += (p - 1) * dec
            else:
                yield from ring_attention(payload, p, dec, direct=w.method.exchange == "direct")

        pending: list = [None] * L
        refresh = allgather_seconds(f, w.kv_wire_bytes(False), everyone) if w.method.stale_kv else 0.0
        output_gather = allgather_seconds(f, w.output_bytes(), everyone)

        def stale_layer(l: int):
            """DistriFusion: attend over last step's K/V; this layer's gather runs behind what follows."""
            enc, dec = self.codec(False)
            if pending[l] is not None and not pending[l].triggered:
                t0 = env.now
                yield pending[l]
                stats["comm"] += env.now - t0
            t = self.compute(t_local, T) + self.gather_copies("stale")
            yield env.timeout(t + enc + (p - 1) * dec)
            stats["compute"] += t
            stats["codec"] += enc + (p - 1) * dec
            pending[l] = env.process(transfer(refresh))

        per_step: dict[str, tuple[float, dict]] = {}       # kind -> (duration, stats) of its first step

        def step(kind: str):
            t0, before = env.now, dict(stats)
            if kind in per_step:                                # identical steps: the first one simulated
                duration, added = per_step[kind]
                yield env.timeout(duration)
                for k, v in added.items():
                    stats[k] += v
                return
            if kind == "stale":
                for l in range(L):
                    yield from stale_layer(l)
            else:                                               # identical layers: one simulated, scaled by L
                yield from layer(kind == "sync", kind == "local")
                yield env.timeout((L - 1) * (env.now - t0))
                for k in stats:
                    stats[k] += (L - 1) * (stats[k] - before[k])
            if kind != "local" and w.gather_each_step:         # a local step has the whole output already
                yield from exposed(transfer(output_gather), 0.0)
            if kind != "stale":                                 # stale steps depend on the gathers still in flight
                per_step[kind] = env.now - t0, {k: stats[k] - before[k] for k in stats}

        def generation():
            for k in range(w.steps):
                warm = k < w.warmup_steps
                kind = ("local" if w.warmup_mode == "local" else "sync") if warm else \
                    "stale" if w.method.stale_kv else "steady"
                yield from step(kind)
                stats["bytes"] += self.step_bytes(kind)
            for ev in pending:
                if ev is not None and not ev.triggered:
                    yield ev
            latents = 0 if w.gather_each_step else w.gather_bytes(w.steps - 1)
            if latents:                                         # the sharded latents, gathered once
                yield from exposed(transfer(allgather_seconds(f, latents, everyone)), 0.0)
                stats["bytes"] += p * (p - 1) * latents

        env.process(generation())
        env.run()
        return Prediction(latency_s=env.now, compute_s=stats["compute"], comm_s=stats["comm"],
                          codec_s=stats["codec"], bytes_on_wire=int(stats["bytes"]))

    def _pipefusion_run(self) -> Prediction:
        """PipeFusion (:mod:`.pipefusion`): a stage's layers on its GPUs (their sequence parallelism's exchanges
        added to each layer, not overlapped), activations over the fabric shard by shard."""
        w, f = self.w, self.c.fabric
        groups, layers = pipefusion.stage_groups(w), pipefusion.stage_layers(w.shape.layers, w.stages)
        u, r = w.degrees
        sp = u * r

        def exchange(g: list[int], tokens: float) -> float:
            kv, t = pipefusion.shard_kv_bytes(w, tokens), 0.0
            if u > 1:
                t += max(alltoall_seconds(f, kv * 3 / 2, g[i:i + u]) + alltoall_seconds(f, kv / 2, g[i:i + u])
                         for i in range(0, sp, u))
            if r > 1:
                t += (r - 1) * sendrecv_seconds(f, kv / u, [(g[i], g[(i + u) % sp]) for i in range(sp)])
            return t

        @cache                                          # a stage sees a few token counts, many times
        def stage_seconds(s: int, tokens: float) -> float:
            compute = max(layer_seconds(self.c.devices[x], self.eff[x], tokens / sp, w.tokens, w.shape.hidden,
                                        w.shape.heads, w.shape.act_bytes, w.shape.cross_tokens) * self.c.scale(x)
                          for x in groups[s])
            return layers[s] * (compute + exchange(groups[s], tokens))

        costs = pipefusion.Costs(stage_seconds, lambda a, b, n: sendrecv_seconds(f, n / sp, list(zip(groups[a],
                                                                                                    groups[b]))),
                                 lambda s, tokens: pipefusion.stage_exchange_bytes(w, layers[s], tokens))
        latency, compute, wait, nbytes = pipefusion.simulate(w, costs, w.method.patches or w.stages)
        return Prediction(latency_s=latency, compute_s=compute, comm_s=wait, codec_s=0.0, bytes_on_wire=nbytes)

    def _cfg_run(self) -> Prediction:
        """CFG parallel (:mod:`.cfg`): each group simulated on its own ranks, then the partner exchange per step."""
        w, parts = self.w, cfg.groups(self.w)
        per_group = [GpuSimulator(cfg.group_workload(w), self.c.subset(g)).denoise() for g in parts]
        pairs = [pair for a, b in zip(*parts) for pair in ((a, b), (b, a))]
        return cfg.combined(w, per_group, sendrecv_seconds(self.c.fabric, cfg.partner_bytes(w), pairs))

    def step_bytes(self, kind: str) -> int:
        w, p, L = self.w, self.w.world, self.w.shape.layers
        if kind == "local":
            return 0
        return p * (p - 1) * (L * w.kv_wire_bytes(kind == "sync") + w.output_bytes() * w.gather_each_step)


def _ulysses_groups(w: Workload, p: int) -> list[list[int]]:
    u, _ = w.degrees
    return [list(range(g * u, g * u + u)) for g in range(p // u)]


def _ring_groups(w: Workload, p: int) -> list[list[int]]:
    u, _ = w.degrees
    return [list(range(i, p, u)) for i in range(u)]
