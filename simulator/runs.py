"""Measured runs as the simulator is judged on them: one per results folder, read from the folder itself
(``summary.json`` + ``scenario.yaml``, written by ``scenario run``) or from a calibration folder's stored copy.

A calibration keeps the runs it was fitted on in ``runs.json`` (a list of :class:`MeasuredRun` as JSON objects),
so that refitting it, judging a model change in-sample, or leaving one run out (``scenario crossval``) needs the
calibration folder alone, not raw results that may be long gone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..runtime.records import MethodResult, RunState, read_state, read_summary, result_of

RUNS_FILE = "runs.json"
KEPT = ("links", "method", "seed", "status", "latency_s", "launch_job")   # what a stored run keeps of a summary row


@dataclass
class MeasuredRun:
    """A results folder's measured latencies and what is needed to simulate them."""

    folder: str                     # the results folder (its path when measured)
    scenario: dict                  # its scenario.yaml as loaded
    rows: list[MethodResult]        # one per (pass, method, seed), the fields in KEPT
    reference_latency_s: dict[str, float] = field(default_factory=dict)  # single-process reference per seed
    reference_threads: int | None = None
    note: str = ""                  # how the figures were obtained when not read from summary.json
    off_profile: list[dict] = field(default_factory=list)   # probes of links that missed their profile (accepted):
                                                            # src, dst, wire_mbit, rtt_ms, misses
    congestion_control: str = "host"  # the TCP algorithm in force in its nodes ("host": not recorded, the host's)
    corun: dict | None = None       # the host probe (testbed.hostprobe): one forward alone and with every rank at once
    distrifusion_alternated: bool = False   # its DistriFusion ran the runtime's earlier refresh (a synchronous gather
                                            # every other step, K/V two steps stale), which the simulator does not model

    @classmethod
    def from_folder(cls, folder: Path) -> "MeasuredRun":
        meta, rows = read_summary(folder)
        rows = [MethodResult(**{k: getattr(r, k) for k in KEPT}) for r in rows]
        if any(r.launch_job is None for r in rows):         # written before run.json recorded it
            inferred = inferred_launch_jobs(folder)
            for r in rows:
                if r.launch_job is None:
                    r.launch_job = inferred.get(f"{r.links}/{r.method}/seed{r.seed}")
        probes = json.loads((folder / "links.json").read_text()) if (folder / "links.json").is_file() else []
        return cls(str(folder), yaml.safe_load((folder / "scenario.yaml").read_text()), rows,
                   {str(k): float(v) for k, v in (meta.get("reference_latency_s") or {}).items()},
                   meta.get("reference_threads"),
                   off_profile=[{k: p[k] for k in ("src", "dst", "wire_mbit", "rtt_ms", "misses")} for p in probes
                                if p.get("misses")], congestion_control=congestion_in_force(folder),
                   corun=meta.get("corun"))

    @classmethod
    def from_dict(cls, data: dict) -> "MeasuredRun":
        return cls(**(data | {"rows": [result_of(r) for r in data["rows"]]}))

    def to_dict(self) -> dict:
        return asdict(self) | {"rows": [{k: getattr(r, k) for k in KEPT} for r in self.rows]}


def inferred_launch_jobs(folder: Path) -> dict[str, int]:
    """Each job's place in its launch ("<pass>/<method>/seed<k>" -> jobs its processes ran before it) for results
    folders written before run.json recorded it, from the order the jobs were done in: a launch starts at a pass
    whose folder holds launcher logs (one launch for every pass, or one per pass), none of a relaunch. Empty
    otherwise: each job then counts as run in fresh processes, as every job did before ranks were kept."""
    folder = Path(folder)
    done = read_state(folder).methods_done
    passes = dict.fromkeys(job.split("/")[0] for job in done)
    logs = {p: [f.name for f in (folder / p).glob("*launcher*.log")] for p in passes}
    if not done or not logs[done[0].split("/")[0]] or any(n.startswith("relaunch") for v in logs.values() for n in v):
        return {}
    out, position, current = {}, 0, None
    for job in done:
        pass_name = job.split("/")[0]
        if pass_name != current:
            current = pass_name
            position = 0 if logs[pass_name] else position
        out[job] = position
        position += 1
    return out


def congestion_in_force(folder: Path) -> str:
    """The TCP congestion control its emulated nodes ran (``environment.json``); "host" where not recorded."""
    try:
        env = json.loads((Path(folder) / "environment.json").read_text())
    except (OSError, ValueError):
        return "host"
    return (env.get("congestion_control") or {}).get("in_force", "host")


def is_calibration(folder: Path) -> bool:
    return (Path(folder) / "calibration.json").is_file()


def results_folders(root: Path) -> list[Path]:
    """The results folders below ``root`` (those with summary.json and scenario.yaml), whatever their state."""
    return [s.parent for s in sorted(Path(root).rglob("summary.json")) if (s.parent / "scenario.yaml").is_file()]


def unusable(results: Iterable[Path | MeasuredRun]) -> list[tuple[Path, RunState]]:
    """Results folders below ``results`` whose timings may not judge or fit the simulator: not complete (running,
    interrupted, failed) or contaminated by another emulation; :func:`read_runs` leaves them out."""
    return [(f, s) for item in results if not isinstance(item, MeasuredRun) and not is_calibration(item)
            for f in results_folders(item) if not (s := read_state(f)).usable]


def read_runs(results: Iterable[Path | MeasuredRun], exclude: Iterable[str] = ()) -> list[MeasuredRun]:
    """Every measured run under ``results``: complete, uncontaminated results folders found below each path, a
    calibration folder's stored runs, or runs given as they are. A folder is read once (the first time it
    appears); those named in ``exclude`` are left out, and so are those :func:`unusable` names."""
    out: dict[str, MeasuredRun] = {}
    skip = set(map(str, exclude))
    for item in results:
        if isinstance(item, MeasuredRun):
            found = [item]
        elif is_calibration(item) and (Path(item) / RUNS_FILE).is_file():
            found = [MeasuredRun.from_dict(d) for d in json.loads((Path(item) / RUNS_FILE).read_text())]
        else:
            found = [MeasuredRun.from_folder(f) for f in results_folders(item) if read_state(f).usable]
        for run in found:
            if run.folder not in skip:
                out.setdefault(run.folder, run)
    return list(out.values())


def write_runs(folder: Path, runs: list[MeasuredRun]) -> None:
    (Path(folder) / RUNS_FILE).write_text(json.dumps([r.to_dict() for r in runs], indent=1))
