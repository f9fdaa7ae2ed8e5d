"""xDiT's PipeFusion as SimPy processes: the layers split into P stages (one per rank), the image into M patches.

Warmup steps run synchronously: the whole sequence passes stage by stage, each stage sending every token's hidden
state on, and the last stage's new latents go back to the first. After warmup the patches stream: a stage takes
patch m of step k as soon as it holds it (from the stage before, or for the first stage the last stage's updated
patch of the previous step) and attends over that fresh patch and every other patch's keys and values as its
previous pass left them (stale, never exchanged). Sends are asynchronous and queue on their link, so a step costs
about M patch passes of the slowest stage, and the pipeline fills once. The text rides with the first patch. With a
codec, activations after warmup travel compressed (the runtime's residual streams); latents back do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import simpy

from ..kernels.compressors import make_compressor
from .workload import Workload


@dataclass(frozen=True)
class Costs:
    """What the PipeFusion model asks of a cluster model, per stage: one pass of stage s over ``tokens`` queries (all
    its layers, keys the whole sequence, its ranks' own sequence parallelism included), the bytes that pass puts on
    the wire inside the stage, and one send of ``nbytes`` from stage a to stage b (its ranks' shards in parallel)."""

    stage_seconds: Callable[[int, float], float]
    send_seconds: Callable[[int, int, float], float]
    stage_bytes: Callable[[int, float], float] = lambda s, tokens: 0.0


def stage_groups(w: Workload) -> list[list[int]]:
    """Each stage's ranks (xDiT: sequence parallelism inner, so a stage is consecutive ranks)."""
    sp = w.world // w.stages
    return [list(range(s * sp, (s + 1) * sp)) for s in range(w.stages)]


def stage_layers(layers: int, stages: int) -> list[int]:
    """Layers per stage, as even as they split (the first stages take the remainder)."""
    return [layers // stages + (s < layers % stages) for s in range(stages)]


def activation_bytes(w: Workload, tokens: float, warm: bool) -> float:
    """One send of ``tokens`` activations stage to stage: compressed (the method's codec) after warmup. The
    codec's time is not modelled here."""
    if w.method.compressed and not warm:
        return make_compressor(w.method.codec.compressor).wire_nbytes(round(tokens), w.shape.hidden)
    return tokens * w.shape.hidden * w.shape.act_bytes


def shard_kv_bytes(w: Workload, tokens: float) -> float:
    """K+V of one rank's shard when a stage's ``tokens`` split over its ulysses x ring ranks."""
    u, r = w.degrees
    return 2 * tokens / (u * r) * w.shape.hidden * w.shape.act_bytes


def stage_exchange_bytes(w: Workload, layers: int, tokens: float) -> float:
    """What one pass of a stage's ``layers`` puts on the wire inside the stage: Ulysses' all-to-alls (Q, K, V in,
    the output back) and the ring's K/V hops, on every rank."""
    u, r = w.degrees
    kv = shard_kv_bytes(w, tokens)
    return layers * u * r * ((u - 1) / u * 2 * kv + (r - 1) * kv / u)


def latent_bytes(w: Workload, tokens: float) -> float:
    return tokens * w.shape.out_channels * w.shape.act_bytes


def simulate(w: Workload, costs: Costs, patches: int) -> tuple[float, float, float, int]:
    """(latency, compute of the slowest stage, exposed waits of the first stage, bytes on the wire)."""
    p, m = w.stages, patches
    env = simpy.Environment()
    image, text = w.batch * w.image_tokens, w.batch * w.shape.text_tokens
    arrived: dict[tuple[int, int, int], simpy.Event] = {}     # (stage, step, patch) -> its input is in
    links = {(s, (s + 1) % p): simpy.Resource(env, 1) for s in range(p)}
    stats = dict(compute=[0.0] * p, wait=0.0, bytes=0.0)

    def event(key) -> simpy.Event:
        return arrived.setdefault(key, env.event())

    def send(a: int, b: int, nbytes: float, key):
        with links[(a, b)].request() as req:
            yield req
            yield env.timeout(costs.send_seconds(a, b, nbytes))
        stats["bytes"] += nbytes
        event(key).succeed()

    def stage(s: int):
        for k in range(w.steps):
            sync = k < w.warmup_steps
            for j in range(1 if sync else m):
                if s > 0:
                    yield event((s, k, j))
                elif k > 0:                 # the previous step's patch (after a synchronous step: the whole image)
                    t0 = env.now
                    yield event((0, k - 1, 0 if k - 1 < w.warmup_steps else j))
                    stats["wait"] += env.now - t0
                tokens = image + text if sync else image / m + (text if j == 0 else 0)
                secs = costs.stage_seconds(s, tokens)
                yield env.timeout(secs)
                stats["compute"][s] += secs
                stats["bytes"] += costs.stage_bytes(s, tokens)
                if s < p - 1:
                    first = sync or k == w.warmup_steps         # a patch stream's first message: full precision
                    env.process(send(s, s + 1, activation_bytes(w, tokens, first), (s + 1, k, j)))
                elif k < w.steps - 1 and p > 1:
                    env.process(send(s, 0, latent_bytes(w, image if sync else image / m), (0, k, j)))
                elif k < w.steps - 1:                       # one stage: its own latents, nothing sent
                    event((0, k, j)).succeed()

    for s in range(p):
        env.process(stage(s))
    env.run()
    return env.now, max(stats["compute"]), stats["wait"], int(stats["bytes"])
