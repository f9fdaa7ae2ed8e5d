"""Simulator benchmarks and the published-table check.

  python -m compactbed.simulator.bench sweep      1,000 configurations, 2-64 nodes, mixed links and methods:
                                                  wall time, and time per config against nodes x layers x steps
  python -m compactbed.simulator.bench published  FLUX.1-dev on 4 GPUs over 500 / 2000 MB/s Ethernet with a
                                                  compute profile anchored to the paper's single-GPU time:
                                                  predicted vs published latency and speedup over ring
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from ..netem.profiles import LinkSpec, named_profiles
from ..scenarios.schema import METHOD_PRESETS
from .costs import Calibration
from .devices import l20_profile
from .model import Cluster, Simulator
from .workload import FLUX_DEV, TINY, Workload

# CompactFusion, Ethernet table (4 GPUs, FLUX.1-dev, 28 steps, 1024 px, 1 warmup step), seconds.
PUBLISHED = {500: {"single": 28.06, "ring": 136.5, "compact-1bit": 20.9, "compact-2bit": 27.5,
                   "distrifusion": 139.7, "patch": 141.6, "ulysses": 75.6},
             2000: {"single": 28.06, "ring": 44.4, "compact-1bit": 13.9, "compact-2bit": 16.1, "distrifusion": 42.2}}


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
        device = "cpu" if shape is TINY else "l20"
        t0 = time.perf_counter()
        Simulator(w, Cluster(tuple(1.0 for _ in range(p)), links, device), calib).run()
        times.append(time.perf_counter() - t0)
        sizes.append(p * shape.layers * steps)
    total = time.perf_counter() - t_all
    sizes, times = np.array(sizes), np.array(times)
    slope = np.polyfit(np.log(sizes), np.log(times), 1)[0]
    print(f"{configs} configurations (2-64 nodes, tiny and FLUX shapes, 7 methods, 30% heterogeneous links): "
          f"{total:.2f} s total, {1e3 * times.mean():.2f} ms mean, {1e3 * times.max():.2f} ms max")
    print(f"log-log slope of time per config vs nodes x layers x steps: {slope:.2f} (1.0 = linear)")


def published(calib: Calibration) -> None:
    calib.devices["l20"] = l20_profile()
    print("FLUX.1-dev, 4 ranks, 28 steps, 1 local warmup step, bf16, L20-class compute, one rate-limited NIC "
          "per GPU (no shaper burst), link delay 0.1 ms")
    print(f"{'link':>9} {'method':>14} {'published s':>11} {'predicted s':>11} {'pub vs ring':>11} {'pred vs ring':>12}")
    for mbytes, table in PUBLISHED.items():
        link = LinkSpec(rate_mbit=mbytes * 8, delay_ms=0.1)
        cluster = Cluster((1.0,) * 4, {(i, j): link for i in range(4) for j in range(4) if i != j}, "l20",
                          shared_uplink=True, htb_shaped=False)
        pred = {}
        for name in table:
            if name == "single":
                continue
            m = METHOD_PRESETS[name]
            w = Workload(FLUX_DEV, 4096, batch=1, steps=28, world=4, method=m,
                         warmup_steps=1 if m.warms_up else 0, warmup_mode="sync" if m.all_to_all else "local")
            pred[name] = Simulator(w, cluster, calib).run().latency_s
        for name, p in pred.items():
            print(f"{mbytes:>5}MB/s {name:>14} {table[name]:>11.1f} {p:>11.1f} {table['ring'] / table[name]:>10.2f}x "
                  f"{pred['ring'] / p:>11.2f}x")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sweep", "published"])
    ap.add_argument("--calibration", default=None)
    ap.add_argument("--configs", type=int, default=1000)
    a = ap.parse_args(argv)
    calib = Calibration.load(a.calibration)
    calib.devices.setdefault("l20", l20_profile())
    if a.what == "sweep":
        sweep(calib, a.configs)
    else:
        published(calib)


if __name__ == "__main__":
    main()
