"""Predictions for scenarios, and validation of predictions against measured results folders."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..runtime.records import speedups
from ..scenarios.schema import Scenario, ScenarioError, parse_recorded
from .costs import Calibration
from .gpu import GpuSimulator, gpu_cluster_of
from .hardware import shipped
from .model import Cluster, Prediction, Simulator, cluster_of
from .points import corun_factor, exchange_floor, host_factors
from .runs import read_runs
from .workload import Workload, workload_of


@dataclass
class PredictedRow:
    method: str
    latency_s: float
    bound_s: float
    compute_s: float
    comm_s: float
    codec_s: float
    bytes_on_wire: int
    bytes_uncompressed: int
    speedup_vs_uncompressed: float | None = None
    speedup_vs_distrifusion: float | None = None


def on_gpus(scenario: Scenario, device: str | None) -> bool:
    """Predicted as a GPU cluster (:mod:`.gpu`): a shipped GPU profile is asked for, or the scenario's hardware is
    and no emulation-host profile overrides it."""
    if device is None:
        return scenario.hardware is not None
    return device in shipped().devices


def describe_hardware(scenario: Scenario, device: str | None) -> str:
    """What a prediction runs on, in words."""
    if not on_gpus(scenario, device):
        return f"device profile {device or 'cpu'} (calibrated)"
    c = gpu_cluster_of(scenario, device)
    machines = len(set(c.fabric.machine))
    kinds = ", ".join(sorted({d.name for d in c.devices}))
    nics = ", ".join(sorted({x.name for x in c.fabric.nic}))
    within = f" over {c.fabric.intra.name}" if machines < c.world else ""
    paths = ", shaped paths between machines" if c.fabric.paths else ""
    return f"{kinds} on {machines} machine{'s' if machines > 1 else ''}{within}, NIC {nics}{paths}"


def predict_latencies(scenario: Scenario, calib: Calibration, device: str | None = None) -> dict[str, float]:
    """Each method's predicted latency on the scenario's shaped links (no bound pass: for curves over many links)."""
    if on_gpus(scenario, device):
        c = gpu_cluster_of(scenario, device)
        return {m.name: GpuSimulator(workload_of(scenario, m), c).run().latency_s for m in scenario.methods}
    c = cluster_of(scenario, device or "cpu")
    return {m.name: Simulator(workload_of(scenario, m), c, calib).run().latency_s for m in scenario.methods}


def predict(scenario: Scenario, calib: Calibration, device: str | None = None, timeline: bool = False,
            exchange_floor_s: float = 0.0, host_factor: float = 1.0
            ) -> tuple[list[PredictedRow], dict[str, Prediction]]:
    """The scenario's table, predicted: on its ``hardware`` (or the GPU ``device``) by the GPU-cluster model, else on
    a profile of the calibration (default: the emulation host, ``cpu``), its compute scaled by ``host_factor`` (this
    host's pace against the calibration runs', :func:`.points.generation_pace`) and every exchange at no less than
    ``exchange_floor_s`` (this host's, from its host probe: ``testbed.hostprobe``)."""
    rows, details = [], {}
    if on_gpus(scenario, device):
        shaped, bound = gpu_cluster_of(scenario, device), gpu_cluster_of(scenario, device, unlimited_rate=True)

        def simulate(w, cluster, timeline=False):
            return GpuSimulator(w, cluster).run()
    else:
        device = device or "cpu"
        if device not in calib.devices:
            raise ScenarioError(f"no device profile {device!r}: the calibration has {', '.join(calib.devices)}, the "
                                f"shipped GPU profiles are {', '.join(shipped().devices)}")
        shaped, bound = (cluster_of(scenario, device, unlimited_rate=lifted).on_host(host_factor, exchange_floor_s)
                         for lifted in (False, True))

        def simulate(w, cluster, timeline=False):
            return Simulator(w, cluster, calib, timeline=timeline).run()
    for method in scenario.methods:
        w = workload_of(scenario, method)
        p = simulate(w, shaped, timeline)
        b = simulate(w, bound)
        raw = simulate(workload_of(scenario, method.model_copy(update={"codec": None})), bound)
        details[method.name] = p
        rows.append(PredictedRow(method.name, p.latency_s, b.latency_s, p.compute_s, p.comm_s, p.codec_s,
                                 p.bytes_on_wire, raw.bytes_on_wire))
    ratios = speedups({r.method: r.latency_s for r in rows})
    for r in rows:
        r.speedup_vs_uncompressed, r.speedup_vs_distrifusion = ratios[r.method]
    return rows, details


@dataclass
class Case:
    """One measured configuration (results folder, link pass, method) and its prediction. ``measured_s`` is the
    median over its repeats (the scenario's seeds), so one noisy run does not decide the error."""

    results: str
    links: str
    method: str
    world: int
    measured_s: float
    predicted_s: float
    repeats: int = 1
    spread: float = 0.0            # (max - min) / median of the repeats
    host_factor: float = 1.0       # compute scaled by the host's speed during the run (see measured_cases)
    corun: float | None = None     # the run's host probe: slowdown with every rank computing at once
    exchange_floor_s: float | None = None   # the run's host probe: the least an exchange costs on its host

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1


@dataclass
class MeasuredCase:
    """A measured (results folder, link pass, method) with everything needed to simulate it."""

    folder: Path
    links: str
    method: str
    workload: Workload
    cluster: Cluster
    latencies: list[float]
    host_factor: float = 1.0       # the host's speed during the run vs the calibration's (compute scaled by it)
    corun: float | None = None     # the run's host probe: a rank's slowdown with every rank computing at once

    @property
    def median_s(self) -> float:
        return float(np.median(self.latencies))


def as_probed(links: dict, off_profile: list[dict], calib: Calibration | None) -> dict:
    """The directed links with those that missed their profile (``MeasuredRun.off_profile``) as their probes
    measured them: a missed rate becomes the probed wire rate (as a configured rate that the calibration's wire
    efficiency turns into it), a missed round trip the probed one (half each way, less the host's own)."""
    out = dict(links)
    efficiency, overhead_ms = (calib.link_efficiency, calib.link_overhead_s * 1e3) if calib else (1.0, 0.0)
    for p in off_profile:
        key, update = (p["src"], p["dst"]), {}
        if out[key].rate_mbit and any(m.startswith("rate") for m in p["misses"]):
            update["rate_mbit"] = p["wire_mbit"] / efficiency
        if any(m.startswith("RTT") for m in p["misses"]):
            update["delay_ms"] = max(p["rtt_ms"] / 2 - overhead_ms, 0.0)
        out[key] = out[key].model_copy(update=update)
    return out


def measured_cases(results: list, device: str = "cpu", calib: Calibration | None = None) -> list[MeasuredCase]:
    """Every successful shaped or bound (pass, method) configuration of the measured runs under ``results`` (paths
    or runs, :func:`.runs.read_runs`). With ``calib``, each run's compute is scaled by its host factor
    (``points.host_factors``: its single-process reference generation's time against the calibration runs';
    measured before the distributed runs, no links involved); its host probe (``MeasuredRun.corun``) is reported
    beside it. A case runs in fresh processes where most of its seeds were their launch's first job, or ran before
    ranks were kept across jobs (``launch_job`` not recorded). DistriFusion cases of runs that ran its earlier
    refresh (``MeasuredRun.distrifusion_alternated``) are left out: they measured another program."""
    cases = []
    for run in read_runs(results):
        scenario = parse_recorded(run.scenario, run.folder)
        methods = {m.name: m for m in scenario.methods}
        measured: dict[tuple[str, str], list] = {}
        for row in run.rows:
            if run.distrifusion_alternated and methods[row.method].comm == "distrifusion":
                continue
            if row.ok and row.links != "loopback":
                measured.setdefault((row.links, row.method), []).append(row)
        host = host_factors([run], calib.devices[device]).get(run.folder, 1.0) if calib else 1.0
        corun, floor = corun_factor(run.corun), exchange_floor(run.corun)
        for (links, method), rows in measured.items():
            latencies = [r.latency_s for r in rows]
            fresh = 2 * sum(not r.launch_job for r in rows) > len(rows)
            cluster = cluster_of(scenario, device, unlimited_rate=links == "bound", ideal=links == "ideal")
            cluster = replace(cluster.on_host(host, floor or 0.0), congestion_control=run.congestion_control,
                              links=as_probed(cluster.links, run.off_profile, calib), fresh_processes=fresh)
            cases.append(MeasuredCase(Path(run.folder), links, method, workload_of(scenario, methods[method]),
                                      cluster, latencies, host, corun))
    return cases


def validate(results: list, calib: Calibration, device: str = "cpu") -> list[Case]:
    """Predict every measured (pass, method) configuration under ``results`` (paths or runs); errors per case."""
    out = []
    for m in measured_cases(results, device, calib):
        pred = Simulator(m.workload, m.cluster, calib).run()
        median = m.median_s
        out.append(Case(str(m.folder), m.links, m.method, m.cluster.world, median, pred.latency_s,
                        len(m.latencies), (max(m.latencies) - min(m.latencies)) / median, m.host_factor,
                        m.corun, m.cluster.exchange_floor_s or None))
    return out


def mape(cases: list[Case]) -> float:
    return float(np.mean([abs(c.error) for c in cases])) if cases else float("nan")
