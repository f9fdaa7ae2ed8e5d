"""How the emulation host computes with every rank on it: the co-running probe a run records beside its reference.

Each rank computes its share of the batch; on an emulation host the ranks share its cores. How much slower a rank
computes when all of them compute at once depends on the host (real cores or hyperthreads, caches, memory
bandwidth): 4 ranks on 2 cores are not simply 2x slower. The probe times one denoising forward on a rank's share
of the images (one thread), first in one process alone, then in one process per rank at once (forked from the
coordinator, which holds the model: nothing is loaded again; no links are involved). Recorded in the run's
summary as ``corun`` and reported by ``scenario simcheck`` (:func:`..simulator.points.corun_factor`); the simulator
does not price compute with it yet (docs/VALIDATION.md, host probe).
"""

from __future__ import annotations

import multiprocessing as mp
import time

import torch

from ..runtime.models import DiTModel
from ..runtime.sampling import make_velocity
from ..scenarios.schema import Scenario

TARGET_S = 0.6          # time of the calls timed alone (their count is set from one untimed call)
MAX_CALLS = 50


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


def _timed(call, calls: int, start, queue) -> None:
    torch.set_num_threads(1)
    call()                                              # warm: allocator, first-call paths
    start.wait()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    queue.put((time.perf_counter() - t0) / calls)


def _at_once(call, calls: int, processes: int, timeout_s: float) -> list[float]:
    """Seconds per call in each of ``processes`` forked processes started together."""
    ctx = mp.get_context("fork")
    queue, start = ctx.Queue(), ctx.Barrier(processes)
    procs = [ctx.Process(target=_timed, args=(call, calls, start, queue), daemon=True) for _ in range(processes)]
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
    """``{"ranks", "calls", "alone_s", "together_s"}``: seconds per forward alone and in each of the scenario's
    ranks at once (sorted)."""
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
    alone = _at_once(call, calls, 1, timeout)[0]
    together = _at_once(call, calls, scenario.world_size, timeout)
    return dict(ranks=scenario.world_size, calls=calls, alone_s=alone, together_s=together)
