"""How the emulation host computes with every rank on it: the co-running probe a run records beside its reference.

Each rank computes its share of the batch; on an emulation host the ranks share its cores. How much slower a rank
computes when all of them compute at once depends on the host (real cores or hyperthreads, caches, memory
bandwidth): 4 ranks on 2 cores are not simply 2x slower. The probe times one denoising forward on a rank's share
of the images (one thread), first in one process alone, then in one process per rank at once (forked from the
coordinator, which holds the model: nothing is loaded again; no links are involved). Then rounds of the same at
once with an exchange after every attention layer (one ring hop over gloo on loopback of the rank's K/V shard: send
to the next rank, receive from the previous, as ring attention does), alternated with rounds without; what that
adds per exchange (median round) is the least an exchange costs on this host beside computing ranks (waking the
ranks, gloo's threads), whatever the link. Recorded in the run's summary as ``corun`` and reported by ``scenario
simcheck`` (:func:`..simulator.points.corun_factor`, :func:`..simulator.points.exchange_floor`); the simulator prices
each exchange of the run at no less than that floor, and does not price compute with the co-run factor yet
(docs/VALIDATION.md, host probe).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from statistics import median

import torch
import torch.distributed as dist

from ..runtime.activations import attention_modules
from ..runtime.models import DiTModel
from ..runtime.sampling import make_velocity
from ..scenarios.schema import Scenario
from .launch import free_port

TARGET_S = 0.6          # time of the calls timed alone (their count is set from one untimed call)
MAX_CALLS = 50
EXCHANGE_ROUNDS = 3     # (without, with exchanges) pairs; the floor is their median difference


def _forward(model: DiTModel, scenario: Scenario):
    """One forward on a rank's share of the images (at least one image)."""
    share = scenario.conditions[:max(1, len(scenario.conditions) // scenario.world_size)]
    velocity = make_velocity(model, model.transformer, share, scenario.resolution, scenario.guidance)
    x = model.initial_tokens(len(share), scenario.resolution, 0)
    sigma = model.sigmas(scenario.steps, scenario.resolution)[0]

    @torch.no_grad()
    def call():
        velocity(x, sigma)
    return call


def _ring_hops(transformer, rank: int, world: int) -> list:
    """Forward hooks on every attention module: one ring hop of twice its output (the rank's K and V shard: its
    output is 1/P of the images over the whole sequence, a shard 1/P of the sequence over every image)."""
    def hop(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        send = torch.zeros(2 * x.numel(), dtype=x.dtype)
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return [m.register_forward_hook(hop) for m in attention_modules(transformer)]


def _timed(call, calls: int, start, queue, rank: int = 0, exchange: tuple | None = None) -> None:
    """Time ``calls`` calls after ``start``; with ``exchange`` = (transformer, world, port), each attention layer
    also does a ring hop among the processes (a gloo group over loopback)."""
    torch.set_num_threads(1)
    hooks = []
    if exchange:
        transformer, world, port = exchange
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        hooks = _ring_hops(transformer, rank, world)
    try:
        call()                                          # warm: allocator, first-call paths, connections
        start.wait()
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        queue.put((time.perf_counter() - t0) / calls)
    finally:
        for h in hooks:
            h.remove()
        if exchange:
            dist.destroy_process_group()


def _at_once(call, calls: int, processes: int, timeout_s: float, transformer=None) -> list[float]:
    """Seconds per call in each of ``processes`` forked processes started together (with ``transformer``: each
    attention layer of it exchanging in a ring among them)."""
    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(processes)
    exchange = (transformer, processes, free_port()) if transformer is not None else None
    procs = [ctx.Process(target=_timed, args=(call, calls, start, queue, r, exchange), daemon=True)
             for r in range(processes)]
    for p in procs:
        p.start()
    try:
        return sorted(queue.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def corun_probe(model: DiTModel, scenario: Scenario) -> dict:
    """``{"ranks", "calls", "alone_s", "together_s", "exchange_rounds", "exchanges"}``: seconds per forward alone and
    in each of the scenario's ranks at once (sorted); then :data:`EXCHANGE_ROUNDS` rounds of (at once, at once with
    ``exchanges`` ring hops per forward), each the median rank, alternated so that both see the host alike. The last
    two are None on one rank, or where that part failed (``exchange_error`` says why)."""
    call = _forward(model, scenario)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        call()
        t0 = time.perf_counter()
        call()
        one = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    calls = max(2, min(MAX_CALLS, round(TARGET_S / max(one, 1e-6))))
    timeout = 60 + 20 * calls * one * scenario.world_size
    p = scenario.world_size
    alone = _at_once(call, calls, 1, timeout)[0]
    together = _at_once(call, calls, p, timeout)
    out = dict(ranks=p, calls=calls, alone_s=alone, together_s=together, exchange_rounds=None, exchanges=None)
    if p > 1:
        try:
            rounds = [[median(together), median(_at_once(call, calls, p, timeout, model.transformer))]]
            for _ in range(EXCHANGE_ROUNDS - 1):
                rounds.append([median(_at_once(call, calls, p, timeout)),
                               median(_at_once(call, calls, p, timeout, model.transformer))])
            out |= dict(exchange_rounds=rounds, exchanges=len(attention_modules(model.transformer)))
        except Exception as e:          # the compute probe stands without it
            out["exchange_error"] = f"{type(e).__name__}: {e}"
    return out
