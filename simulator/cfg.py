"""xDiT's CFG parallel: the guidance batch's two halves on two groups of ranks.

xDiT makes the sequence-parallel group the inner dimension, so group g is the consecutive ranks
[g*W/2, (g+1)*W/2). Each group runs the method's sequence parallelism on its half of the batch; after every step each
rank exchanges its half's velocity (or its shard of it) with its partner (rank r and r + W/2), all pairs at once. A
prediction simulates each group as a workload of its own (half the batch on half the ranks; on the emulation host it
still shares the host's cores with the other group) and adds the partner exchange per step; the slower group gates.
What the two groups share besides cores (one machine's GPU fabric) is not contended between them.
"""

from __future__ import annotations

from dataclasses import replace

from .workload import Workload


def group_workload(w: Workload) -> Workload:
    """One CFG group's workload: half the batch on half the ranks."""
    return replace(w, batch=w.batch // w.cfg, world=w.world // w.cfg, cfg=1)


def groups(w: Workload) -> list[list[int]]:
    """Each CFG group's ranks, in xDiT's layout."""
    h = w.world // w.cfg
    return [list(range(g * h, (g + 1) * h)) for g in range(w.cfg)]


def partner_bytes(w: Workload) -> int:
    """What a rank sends its partner after each step: its group's whole velocity (half the batch), or its own
    shard of it where the ranks keep the latents sharded."""
    sp = 1 if w.gather_each_step else w.world // w.cfg
    return w.batch // w.cfg * w.image_tokens // sp * w.shape.out_channels * w.shape.act_bytes


def combined(w: Workload, per_group: list, exchange_s: float):
    """The run (a :class:`.model.Prediction`): the slower group's, plus the partner exchange after every step but
    the local warmup steps (each rank computes both halves there)."""
    slow = max(per_group, key=lambda p: p.latency_s)
    steps = w.steps - (w.warmup_steps if w.warmup_mode == "local" else 0)
    extra = steps * exchange_s
    return replace(slow, latency_s=slow.latency_s + extra, comm_s=slow.comm_s + extra, timeline=[],
                   bytes_on_wire=sum(p.bytes_on_wire for p in per_group) + steps * w.world * partner_bytes(w))
