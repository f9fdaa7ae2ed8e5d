"""Simulator speed: ``python -m compactbed.simulator.bench sweep``: 1,000 configurations, 2-64 nodes, tiny model on
the emulation host's profile and FLUX.1-dev on shipped GPU clusters, mixed links and methods: wall time, and time per
config against nodes x layers x steps. (Predicted against published GPU tables: ``scenario published``.)"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from ..netem.profiles import named_profiles
from ..scenarios.schema import METHOD_PRESETS
from .collectives import Fabric
from .costs import Calibration
from .gpu import GpuCluster, GpuSimulator
from .hardware import shipped
from .model import Cluster, Simulator
from .workload import FLUX_DEV, TINY, Workload


def gpu_cluster(rnd: random.Random, p: int, links: dict) -> GpuCluster:
    """A random shipped GPU cluster of ``p`` ranks: 1, 4 or 8 GPUs per machine, the links between machines."""
    prof = shipped()
    g = min(p, rnd.choice([1, 4, 8]))
    intra = rnd.choice([x for x in prof.links.values() if x.scope == "intra"])
    nic = rnd.choice([x for x in prof.links.values() if x.scope == "nic"])
    fabric = Fabric(tuple(r // g for r in range(p)), intra, (nic,) * (-(-p // g)), links)
    return GpuCluster((rnd.choice(list(prof.devices.values())),) * p, fabric)


def sweep(calib: Calibration, configs: int = 1000, seed: int = 0) -> None:
    rnd = random.Random(seed)
    profiles = list(named_profiles().values())
    methods = [METHOD_PRESETS[m] for m in ("ring", "patch", "distrifusion", "compact-1bit", "compact-2bit",
                                          "compact-lowrank", "ulysses")]
    sizes, times = [], []
    t_all = time.perf_counter()
    for _ in range(configs):
        p = rnd.choice([2, 4, 8, 16, 32, 64])
        shape = rnd.choice([TINY, FLUX_DEV])
        method = rnd.choice(methods)
        steps = rnd.choice([8, 20, 28, 50])
        links = {(i, j): rnd.choice(profiles) for i in range(p) for j in range(p) if i != j} \
            if rnd.random() < 0.3 else {(i, j): profiles[1] for i in range(p) for j in range(p) if i != j}
        tokens = 4096 if shape is FLUX_DEV else 64
        w = Workload(shape, tokens, batch=p * 4, steps=steps, world=p, method=method, warmup_steps=1,
                     warmup_mode="sync" if method.all_to_all else "local")
        t0 = time.perf_counter()
        if shape is TINY:
            Simulator(w, Cluster(tuple(1.0 for _ in range(p)), links, "cpu"), calib).run()
        else:
            GpuSimulator(w, gpu_cluster(rnd, p, links)).run()
        times.append(time.perf_counter() - t0)
        sizes.append(p * shape.layers * steps)
    total = time.perf_counter() - t_all
    sizes, times = np.array(sizes), np.array(times)
    slope = np.polyfit(np.log(sizes), np.log(times), 1)[0]
    print(f"{configs} configurations (2-64 nodes, tiny and FLUX shapes, 7 methods, 30% heterogeneous links): "
          f"{total:.2f} s total, {1e3 * times.mean():.2f} ms mean, {1e3 * times.max():.2f} ms max")
    print(f"log-log slope of time per config vs nodes x layers x steps: {slope:.2f} (1.0 = linear)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep"])
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--configs", type=int, default=1000)
    a = ap.parse_args(argv)
    calib = Calibration.load(a.calibration)
    sweep(calib, a.configs)


if __name__ == "__main__":
    main()
