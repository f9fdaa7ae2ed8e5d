"""Published multi-GPU tables predicted side by side (``scenario published``): the sets in
``profiles/published.yaml``, each anchored only by its own single-device time."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from ..scenarios.schema import Scenario, parse_scenario
from .gpu import GpuSimulator, gpu_cluster_of
from .hardware import PROFILES_DIR, Anchor
from .workload import workload_of

PUBLISHED_FILE = PROFILES_DIR / "published.yaml"


@dataclass
class Row:
    """One published latency and its prediction; speedups over the set's baseline (a method, or one device)."""

    set: str
    label: str
    nodes: int
    published_s: float
    predicted_s: float
    published_speedup: float | None = None
    predicted_speedup: float | None = None

    @property
    def error(self) -> float:
        return self.predicted_s / self.published_s - 1

    @property
    def speedup_error(self) -> float | None:
        if self.published_speedup is None or self.predicted_speedup is None:
            return None
        return self.predicted_speedup / self.published_speedup - 1


@dataclass
class PublishedSet:
    name: str
    title: str
    source: str
    rows: list[Row]
    not_modelled: dict[str, float]
    published_best: str
    predicted_best: str
    rerun_of: str | None = None         # another set that published the same configuration


@dataclass
class Disagreement:
    """How far two publications of the same configuration lie apart, on the rows (method, GPUs) both give: the
    spread that no single prediction can stay within a tolerance of both across."""

    set: str
    rerun_of: str
    latency: list[float]                # this set's seconds over the other's, less 1, per shared row
    speedup: list[float]                # the same for speedups (each over its own baseline)

    @property
    def rows(self) -> int:
        return len(self.latency)

    @property
    def latency_max(self) -> float:
        return max(map(abs, self.latency))

    @property
    def speedup_max(self) -> float:
        return max(map(abs, self.speedup), default=0.0)


def disagreement(rerun: PublishedSet, original: PublishedSet) -> Disagreement:
    """Compare a set's published rows with those of the set it reruns, row by row."""
    theirs = {(r.label, r.nodes): r for r in original.rows}
    pairs = [(r, theirs[(r.label, r.nodes)]) for r in rerun.rows if (r.label, r.nodes) in theirs]
    if not pairs:
        raise ValueError(f"{rerun.name} reruns {original.name} but the two share no row (method and GPUs)")
    return Disagreement(rerun.name, original.name, [a.published_s / b.published_s - 1 for a, b in pairs],
                        [a.published_speedup / b.published_speedup - 1 for a, b in pairs
                         if a.published_speedup and b.published_speedup])


def _scenario(name: str, common: dict, row: dict) -> Scenario:
    data = dict(common, name=name, output_gather="step")        # xDiT's pipelines gather the output every step
    data["nodes"] = row.get("nodes", common.get("nodes"))
    data["methods"] = [row["method"] if "patches" not in row else    # PipeFusion with its published patch count
                       {"name": f"{row['method']}-m{row['patches']}", "comm": "pipefusion", "patches": row["patches"]}]
    data["parallel"] = {k: row[k] for k in ("cfg_degree", "ulysses_degree") if k in row}
    return parse_scenario(data, f"{PUBLISHED_FILE.name}: {name}")


def predict_set(name: str, entry: dict) -> PublishedSet:
    """Predict every row of one published set with its single-device time as the compute anchor."""
    rows = []
    for r in entry["rows"]:
        sc = _scenario(name, entry["scenario"], r)
        decode = entry.get("decode", True)          # False: the published pipeline returned latents
        w = replace(workload_of(sc, sc.methods[0]), decode=decode)
        anchor = Anchor(model=w.shape.name, resolution=sc.resolution, height=sc.height, frames=sc.frames,
                        steps=sc.steps, batch=w.batch // sc.images, seconds=float(entry["single_s"]),
                        source=entry["source"], decode=decode)
        cluster = gpu_cluster_of(sc)
        cluster = replace(cluster, devices=tuple(replace(d, anchors=(anchor,)) for d in cluster.devices))
        pred = GpuSimulator(w, cluster).run().latency_s
        label = r["method"] + (f" m{r['patches']}" if "patches" in r else "") + \
            (f" cfg{r['cfg_degree']}" if "cfg_degree" in r else "") + \
            (f" u{r['ulysses_degree']}" if "ulysses_degree" in r else "")
        rows.append(Row(name, label, sc.world_size, float(r["seconds"]), pred))
    base = entry.get("baseline", "single")
    for row in rows:
        if base == "single":
            row.published_speedup = entry["single_s"] / row.published_s
            row.predicted_speedup = entry["single_s"] / row.predicted_s
        else:
            ref = next((x for x in rows if x.label == base and x.nodes == row.nodes), None)
            if ref is not None:
                row.published_speedup = ref.published_s / row.published_s
                row.predicted_speedup = ref.predicted_s / row.predicted_s
    best = (min(rows, key=lambda x: x.published_s), min(rows, key=lambda x: x.predicted_s))
    return PublishedSet(name, entry.get("title", name), entry["source"], rows, entry.get("not_modelled") or {},
                        f"{best[0].label} ({best[0].nodes})", f"{best[1].label} ({best[1].nodes})",
                        entry.get("rerun_of"))


def published_sets(path: Path = PUBLISHED_FILE, only: list[str] | None = None) -> list[PublishedSet]:
    raw = yaml.safe_load(path.read_text())
    unknown = sorted(set(only or ()) - set(raw))
    if unknown:
        raise KeyError(f"no published set {', '.join(unknown)}; known: {', '.join(raw)}")
    dangling = [f"{n} (rerun_of: {e['rerun_of']})" for n, e in raw.items() if e.get("rerun_of", n) not in raw]
    if dangling:
        raise KeyError(f"{path.name}: rerun_of names no set: {', '.join(dangling)}")
    return [predict_set(name, entry) for name, entry in raw.items() if not only or name in only]


def disagreements(sets: list[PublishedSet]) -> list[Disagreement]:
    """Every rerun among ``sets`` whose original is among them too."""
    by_name = {s.name: s for s in sets}
    return [disagreement(s, by_name[s.rerun_of]) for s in sets if s.rerun_of in by_name]
