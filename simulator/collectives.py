"""NCCL's collectives over a hierarchical GPU cluster, in the form nccl-tests reports them.

A :class:`Fabric` places ranks on machines: ranks of one machine talk over its intra-node class (NVLink, PCIe),
ranks of different machines through both machines' NICs, each NIC shared by its machine's GPUs, and through the
scenario's shaped path between them where it has one (rate and one-way delay). Costs, for ``n`` bytes per rank
over ``P`` ranks (nccl-tests: busbw = algbw x (P-1)/P for all-gather and all-to-all):

  all-gather (ring)      (P-1) x latency + n (P-1) / busbw           busbw: the slowest edge of the ring
  all-to-all             latency + max(intra share / intra busbw, the NIC's share / NIC busbw)
  send/recv (one hop)    latency + n / bandwidth of that pair        pairs through one NIC share it; a pair
                                                                      reaches the class's P2P bandwidth at most

NCCL runs all-gather as a ring (its tree algorithm is for all-reduce); its rings enter and leave each machine once,
so a cross-machine edge carries as much as any edge and the slowest class gates the ring.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..netem.profiles import LinkSpec
from .hardware import LinkClass

GB = 1e9


@dataclass(frozen=True)
class Fabric:
    """Ranks on machines: ``machine[r]`` is rank r's machine; ``intra`` its GPU-to-GPU class; ``nic[m]`` machine m's
    network interface; ``paths[(a, b)]`` the shaped path between ranks of different machines (rate, delay), if any."""

    machine: tuple[int, ...]
    intra: LinkClass
    nic: tuple[LinkClass, ...]
    paths: dict[tuple[int, int], LinkSpec] | None = None

    @property
    def world(self) -> int:
        return len(self.machine)

    def gpus_on(self, m: int) -> int:
        return self.machine.count(m)

    def crosses(self, a: int, b: int) -> bool:
        return self.machine[a] != self.machine[b]

    def pair(self, a: int, b: int, p2p: bool = False) -> tuple[float, float]:
        """(bytes/s, seconds of latency) of one message a -> b with nothing else on its way; ``p2p``: as a lone
        send/recv (:attr:`LinkClass.pair_gbs`), not as one edge of a collective."""
        bw_of = (lambda c: c.pair_gbs) if p2p else (lambda c: c.busbw_gbs)         # noqa: E731
        if not self.crosses(a, b):
            return bw_of(self.intra) * GB, self.intra.latency_us * 1e-6
        na, nb = self.nic[self.machine[a]], self.nic[self.machine[b]]
        bw, lat = min(bw_of(na), bw_of(nb)) * GB, max(na.latency_us, nb.latency_us) * 1e-6
        path = (self.paths or {}).get((a, b))
        if path is not None:
            if path.rate_bytes_per_s:
                bw = min(bw, path.rate_bytes_per_s)
            lat += path.delay_ms / 1e3
        return bw, lat

    def nics_used(self, ranks: list[int]) -> set[int]:
        """Machines whose NIC a collective over ``ranks`` uses (it spans more than one machine)."""
        machines = {self.machine[r] for r in ranks}
        return machines if len(machines) > 1 else set()


def ring_order(fabric: Fabric, ranks: list[int]) -> list[int]:
    """NCCL's ring: the ranks of one machine next to each other, each machine entered and left once."""
    return sorted(ranks, key=lambda r: (fabric.machine[r], r))


def allgather_seconds(fabric: Fabric, nbytes: float, ranks: list[int]) -> float:
    """Ring all-gather of ``nbytes`` per rank: P-1 steps, each as slow as the ring's slowest edge."""
    p = len(ranks)
    if p < 2:
        return 0.0
    ring = ring_order(fabric, ranks)
    edges = [fabric.pair(ring[i], ring[(i + 1) % p]) for i in range(p)]
    bw, lat = min(e[0] for e in edges), max(e[1] for e in edges)
    return (p - 1) * (lat + nbytes / bw)


def alltoall_seconds(fabric: Fabric, nbytes: float, ranks: list[int]) -> float:
    """All-to-all of ``nbytes`` per rank (1/P to each peer, all at once): the busier of a GPU's intra-node sends and
    its machine's NIC, which carries every cross-machine byte of its GPUs."""
    p = len(ranks)
    if p < 2:
        return 0.0
    chunk = nbytes / p
    worst = 0.0
    for a in ranks:
        intra = [b for b in ranks if b != a and not fabric.crosses(a, b)]
        cross = [b for b in ranks if fabric.crosses(a, b)]
        t = 0.0
        if intra:
            bw, lat = fabric.pair(a, intra[0])
            t = lat + len(intra) * chunk / bw
        if cross:
            sharing = sum(1 for r in ranks if fabric.machine[r] == fabric.machine[a])
            bw = min(fabric.pair(a, b)[0] for b in cross)
            lat = max(fabric.pair(a, b)[1] for b in cross)
            t = max(t, lat + sharing * len(cross) * chunk / bw)
        worst = max(worst, t)
    return worst


def sendrecv_seconds(fabric: Fabric, nbytes: float, pairs: list[tuple[int, int]]) -> float:
    """Every (src, dst) of ``pairs`` sends ``nbytes`` at once (one hop of a ring rotation, a direct exchange): the
    slowest pair, cross-machine pairs leaving one machine sharing its NIC."""
    out: dict[int, int] = {}
    for a, b in pairs:
        if fabric.crosses(a, b):
            out[fabric.machine[a]] = out.get(fabric.machine[a], 0) + 1
    worst = 0.0
    for a, b in pairs:
        bw, lat = fabric.pair(a, b, p2p=True)
        share = out.get(fabric.machine[a], 1) if fabric.crosses(a, b) else 1
        worst = max(worst, lat + share * nbytes / bw)
    return worst
