"""Space-filling designs of emulated scenarios for calibration and validation campaigns.

Hand-picked calibration runs leave holes the held-out runs then fall into; a Latin hypercube
(``scipy.stats.qmc``) spreads a campaign over the link space instead: node count, rate and delay (log scale),
jitter, loss (half the designs lossless: a lossy link switches the emulation host to per-packet forwarding),
one node behind a slower, longer link (a link mix) and the image count. A design's expected run time is checked
with the shipped simulator so a campaign stays within a time budget; designs over it are scaled down in image
count.

usage: python -m compactbed.simulator.design PREFIX --count N --seed S [--out DIR] [--seeds K] [--budget-s T]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml

METHODS = ["ring", "distrifusion", "compact-1bit", "compact-2bit"]
RATE_MBIT = (40.0, 500.0)
DELAY_MS = (1.0, 25.0)
JITTER_MS = (0.0, 4.0)
LOSS_PCT = (0.01, 0.3)
LABELS = (64, 96, 128)


def _log(u: float, lo: float, hi: float) -> float:
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def scenario_of(name: str, u, output: str, seeds: int = 1) -> dict:
    """One scenario from a point ``u`` of the unit hypercube (7 coordinates)."""
    nodes = 2 if u[0] < 0.35 else 4
    link = {"rate_mbit": round(_log(u[1], *RATE_MBIT)), "delay_ms": round(_log(u[2], *DELAY_MS), 1)}
    jitter = round(u[3] * JITTER_MS[1], 1) if u[3] > 0.3 else 0.0
    if jitter:
        link["jitter_ms"] = min(jitter, link["delay_ms"])
    if u[4] >= 0.5:
        link["loss_pct"] = round(_log((u[4] - 0.5) * 2, *LOSS_PCT), 3)
    sc = {"name": name, "nodes": nodes, "link": link}
    if nodes > 2 and u[5] > 0.6:              # node 1 behind a slower, longer link (clean: no jitter or loss)
        slow = {"rate_mbit": max(round(link["rate_mbit"] / 2), 10), "delay_ms": round(link["delay_ms"] * 2, 1)}
        sc["links"] = [{"src": a, "dst": b, **slow} for k in range(nodes) if k != 1 for a, b in ((1, k), (k, 1))]
    sc.update(labels=LABELS[min(int(u[6] * len(LABELS)), len(LABELS) - 1)], steps=8, guidance=1.0,
              methods=list(METHODS), warmup={"mode": "local", "steps": 1}, output=output)
    if seeds > 1:
        sc["seeds"] = list(range(seeds))
    return sc


def predicted_seconds(sc: dict, calib=None) -> float:
    """Expected wall time of a scenario's methods (all seeds) by the simulator (default: shipped calibration)."""
    from ..scenarios.schema import parse_scenario
    from .costs import Calibration
    from .predict import predict

    rows, _ = predict(parse_scenario(sc, "design"), calib or Calibration.load())
    return sum(r.latency_s for r in rows) * len(sc.get("seeds", [0]))


def design(prefix: str, count: int, seed: int, output_root: str = "results/campaign", seeds: int = 1,
           budget_s: float | None = None, calib=None) -> list[dict]:
    """``count`` scenarios named PREFIX_00.. from a Latin hypercube drawn with ``seed``; ``calib`` prices the
    budget check (default: the shipped calibration)."""
    from scipy.stats import qmc

    from .costs import Calibration

    if count < 1:
        raise ValueError("count must be at least 1")
    calib = calib or (Calibration.load() if budget_s else None)
    out = []
    for i, u in enumerate(qmc.LatinHypercube(d=7, seed=seed).random(count)):
        name = f"{prefix}_{i:02d}"
        sc = scenario_of(name, [float(x) for x in u], f"{output_root}/{name}", seeds)
        while budget_s and sc["labels"] > 32 and predicted_seconds(sc, calib) > budget_s:
            sc["labels"] //= 2
        out.append(sc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m compactbed.simulator.design", description=__doc__.split("\n\n")[0])
    ap.add_argument("prefix", help="scenario name prefix, e.g. cal_lhs or held_lhs")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True, help="the design's random seed")
    ap.add_argument("--seeds", type=int, default=1, help="repeats of each scenario (run seeds)")
    ap.add_argument("--budget-s", type=float, help="halve the image count while the predicted time exceeds this")
    ap.add_argument("--out", default="simulator/campaign", help="folder for the YAML files")
    args = ap.parse_args(argv)
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    from .costs import Calibration

    calib = Calibration.load()
    for sc in design(args.prefix, args.count, args.seed, seeds=args.seeds, budget_s=args.budget_s, calib=calib):
        path = folder / f"{sc['name']}.yaml"
        head = (f"# Simulator campaign, Latin-hypercube design (python -m compactbed.simulator.design "
                f"{args.prefix} --count {args.count} --seed {args.seed}).\n")
        path.write_text(head + yaml.safe_dump(sc, sort_keys=False, default_flow_style=None))
        print(f"{path}  predicted {predicted_seconds(sc, calib):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
