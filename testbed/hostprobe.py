"""How the emulation host computes with every rank on it: the co-running probe a run records beside its reference.

Each rank computes its share of the batch; on an emulation host the ranks share its cores. How much slower a rank
computes when all of them compute at once depends on the host (real cores or hyperthreads, caches, memory
bandwidth): 4 ranks on 2 cores are not simply 2x slower. The probe times one denoising forward on a rank's share
of the images (one thread), first in one process alone, then in one process per rank at once (forked from the
coordinator, which holds the model: nothing is loaded again; no links are involved). Then rounds of the same at
once with an exchange after every attention layer over gloo on loopback, of the rank's K/V shard (a ring hop: send
to the next rank, receive from the previous, as ring attention does; a round: to and from every peer at once, as
the direct exchange does), alternated with rounds without; what each adds per exchange (median round) is the least
such an exchange costs on this host beside computing ranks (waking the ranks, gloo's threads), whatever the link.
Recorded in the run's summary as ``corun`` and reported by ``scenario simcheck``
(:func:`..simulator.points.corun_factor`, :func:`..simulator.points.exchange_floor`); the simulator prices each
exchange of the run at no less than the ring hop's floor, and does not price compute with the co-run factor yet
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
EXCHANGE_ROUNDS = 3     # rounds of (without, each kind of exchange); a floor is the median round's difference
EXCHANGE_KINDS = ("ring", "round")      # a ring hop; a round to every peer at once (the direct exchange)


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


def _exchange_hooks(transformer, rank: int, world: int, kind: str) -> list:
    """Forward hooks on every attention module: one exchange of twice its output (the rank's K and V shard: its
    output is 1/P of the images over the whole sequence, a shard 1/P of the sequence over every image). ``ring``: a
    hop (send to the next rank, receive from the previous), as ring attention does; ``round``: a send to and a
    receive from every peer, all posted at once, as the direct exchange does (``runtime.comm.DirectExchange``)."""
    peers = [((rank + 1) % world, (rank - 1) % world)] if kind == "ring" else \
        [(r, r) for r in range(world) if r != rank]

    def exchange(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        send = torch.zeros(2 * x.numel(), dtype=x.dtype)
        ops = []
        for to, of in peers:
            ops += [dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, torch.empty_like(send), of)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return [m.register_forward_hook(exchange) for m in attention_modules(transformer)]


def _timed(call, calls: int, start, queue, rank: int = 0, exchange: tuple | None = None) -> None:
    """Time ``calls`` calls after ``start``; with ``exchange`` = (transformer, world, port, kind), each attention
    layer also exchanges among the processes (:func:`_exchange_hooks`, a gloo group over loopback)."""
    torch.set_num_threads(1)
    hooks = []
    if exchange:
        transformer, world, port, kind = exchange
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        hooks = _exchange_hooks(transformer, rank, world, kind)
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


def _at_once(call, calls: int, processes: int, timeout_s: float, transformer=None, kind: str = "ring"
             ) -> list[float]:
    """Seconds per call in each of ``processes`` forked processes started together (with ``transformer``: each
    attention layer of it exchanging among them, :func:`_exchange_hooks` of ``kind``)."""
    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(processes)
    exchange = (transformer, processes, free_port(), kind) if transformer is not None else None
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
    in each of the scenario's ranks at once (sorted); then :data:`EXCHANGE_ROUNDS` rounds of seconds per forward at
    once without exchanges, with a ring hop and with a round to every peer after each of its ``exchanges`` attention
    layers, each the median rank, alternated so that all three see the host alike. The last two are None on one
    rank, or where that part failed (``exchange_error`` says why)."""
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
            rounds = []
            for k in range(EXCHANGE_ROUNDS):
                rounds.append([median(together if k == 0 else _at_once(call, calls, p, timeout))] +
                              [median(_at_once(call, calls, p, timeout, model.transformer, kind))
                               for kind in EXCHANGE_KINDS])
            out |= dict(exchange_rounds=rounds, exchanges=len(attention_modules(model.transformer)))
        except Exception as e:          # the compute probe stands without it
            out["exchange_error"] = f"{type(e).__name__}: {e}"
    return out
