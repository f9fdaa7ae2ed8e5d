"""Typed records of a results folder: what a method run writes and what the summary, the simulator's calibration
and the dashboard read back. Plain JSON on disk; these dataclasses are the one statement of their fields.

  <method run>/rank<r>.jsonl   one :class:`StepRecord` per denoising step (written by every rank)
  <method run>/run.json        one :class:`RunRecord` (rank 0)
  summary.json                 ``state``: the folder's :class:`RunState`; ``rows``: one :class:`MethodResult` per
                               (link pass, method, seed); plus run metadata. Written atomically.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..netem.cluster import pid_alive

UNCOMPRESSED_BASELINE = "ring"      # speedups are over this method ...
STALE_BASELINE = "distrifusion"     # ... and over this one, within the same link pass and seed


@dataclass
class StepRecord:
    """One rank's denoising step. ``warmup``: None, ``"sync"`` (full precision over the network) or ``"local"``
    (whole sequence on every rank, no communication). Times in seconds; ``layer_compute_s`` keyed by layer index
    (as a string, as JSON keys are)."""

    rank: int
    step: int
    warmup: str | None
    wall_s: float
    comm_wait_s: float
    codec_s: float
    compute_s: float
    bytes_sent: int
    bytes_uncompressed: int
    exchanges: int
    layer_compute_s: dict[str, float]
    comm_hidden_s: float = 0.0      # direct exchanges: time their transfers were in flight beyond the wait
                                    # (behind this rank's own attention block), at most


@dataclass
class RunRecord:
    """One method run as rank 0 saw it: the generation's wall time and how it ran."""

    method: dict
    seed: int
    world: int
    degrees: tuple[int, int]
    latency_s: float
    warmup_steps: int
    warmup_mode: str
    codec_backend: str
    base_consistency: dict
    torch: str
    device: str
    cfg_degree: int = 1            # CFG parallel: groups the guidance batch was split over
    launch_job: int | None = None  # jobs its processes ran before it in their launch (0: fresh processes)


@dataclass
class MethodResult:
    """One row of a results folder's summary: a (link pass, method, seed) run."""

    method: str
    seed: int
    links: str = "shaped"          # shaped | bound (rate unlimited, delay kept) | ideal (no shaping, no added
                                   # delay) | loopback
    status: str = "ok"
    error: str = ""
    latency_s: float | None = None
    step_s_mean: float | None = None
    compute_s: float | None = None
    comm_wait_s: float | None = None
    codec_s: float | None = None
    bytes_on_wire: int | None = None
    bytes_uncompressed: int | None = None
    compression_ratio: float | None = None
    speedup_vs_uncompressed: float | None = None
    speedup_vs_distrifusion: float | None = None
    latency_bound_s: float | None = None
    over_bound: float | None = None
    latency_ideal_s: float | None = None
    over_ideal: float | None = None
    quality: dict = field(default_factory=dict)
    base_consistency: dict = field(default_factory=dict)
    launch_job: int | None = None  # jobs its ranks ran before it in their launch (0: fresh processes; None: not
                                   # recorded)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class RunState:
    """Where a results folder stands. ``running`` until its run ends ``complete``, ``interrupted`` (Ctrl-C,
    SIGTERM) or ``failed`` (``reason`` says why); a run killed outright stays ``running`` with a dead owner, which
    :meth:`effective` reports as interrupted. ``contaminated``: why its timings are not its own (another emulation
    ran beside it); ``link_errors``: links that missed their profile and were accepted (``--accept-link-error``)."""

    state: str = "running"
    reason: str = ""
    methods_done: list[str] = field(default_factory=list)      # "<pass>/<method>/seed<k>", in the order run
    owner_pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    contaminated: str = ""
    link_errors: list[str] = field(default_factory=list)

    def effective(self) -> "RunState":
        """This state, with a ``running`` folder whose owner process is gone (on this host) as interrupted."""
        if self.state == "running" and self.host == socket.gethostname() and not pid_alive(self.owner_pid):
            return RunState(**(asdict(self) | {"state": "interrupted", "reason": f"its process ({self.owner_pid}) "
                                               f"ended without finishing the run (killed?)"}))
        return self

    @property
    def usable(self) -> bool:
        """Complete and uncontaminated: its timings may judge or fit the simulator."""
        return self.state == "complete" and not self.contaminated

    def describe(self) -> str:
        """One line: the state, why, and how much was done."""
        parts = [self.state] + [x for x in (self.reason, self.contaminated and f"contaminated: {self.contaminated}",
                                             self.link_errors and f"links off profile: {'; '.join(self.link_errors)}")
                                if x]
        return ", ".join(parts) + f" ({len(self.methods_done)} method runs done)"


LEGACY_STATE = RunState(state="complete", reason="recorded before results folders carried their state",
                        owner_pid=0, host="")


def _build(cls, data: dict):
    """A record from its JSON object; keys the record does not know are refused, naming the record."""
    known = {f.name for f in fields(cls)}
    extra = sorted(set(data) - known)
    if extra:
        raise ValueError(f"{cls.__name__}: unknown fields {', '.join(extra)}")
    try:
        return cls(**data)
    except TypeError as e:          # a required field missing
        raise ValueError(f"{cls.__name__}: {e}") from None


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new file, never
    a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_steps(path: Path, records: list[StepRecord]) -> None:
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(asdict(rec)) + "\n")


def read_steps(run_dir: Path) -> list[StepRecord]:
    """Every rank's step records of a method run, rank by rank."""
    return [_build(StepRecord, json.loads(line)) for f in sorted(Path(run_dir).glob("rank*.jsonl"))
            for line in f.open() if line.strip()]


def write_run(path: Path, run: RunRecord) -> None:
    path.write_text(json.dumps(asdict(run), indent=1))


def read_run(run_dir: Path) -> RunRecord:
    return _build(RunRecord, json.loads((Path(run_dir) / "run.json").read_text()))


def result_of(data: dict) -> MethodResult:
    return _build(MethodResult, data)


def write_summary(folder: Path, meta: dict, state: RunState, rows: list[MethodResult]) -> None:
    write_atomic(Path(folder) / "summary.json",
                 json.dumps(meta | {"state": asdict(state), "rows": [asdict(r) for r in rows]}, indent=1, default=float))


def read_summary(folder: Path) -> tuple[dict, list[MethodResult]]:
    """A results folder's summary: its metadata (everything but the rows and the state) and its rows."""
    data = json.loads((Path(folder) / "summary.json").read_text())
    data.pop("state", None)
    rows = [result_of(r) for r in data.pop("rows")]
    return data, rows


def read_state(folder: Path) -> RunState:
    """A results folder's :meth:`RunState.effective` state (folders from before states were recorded: complete)."""
    data = json.loads((Path(folder) / "summary.json").read_text())
    return _build(RunState, data["state"]).effective() if "state" in data else LEGACY_STATE


def speedups(latency_s: dict[str, float]) -> dict[str, tuple[float | None, float | None]]:
    """Each method's speedup over :data:`UNCOMPRESSED_BASELINE` and over :data:`STALE_BASELINE` (None where that
    method did not run), from latencies of one link pass and seed."""
    base, stale = latency_s.get(UNCOMPRESSED_BASELINE), latency_s.get(STALE_BASELINE)
    return {m: (base / s if base else None, stale / s if stale else None) for m, s in latency_s.items()}
