"""The local warmup step in fresh processes and in processes kept from an earlier job of their launch: where each
job sits in its launch (recorded, or inferred for older results folders), the kept-process factor's fit (robust,
on what the step adds to the run), its fit into an existing calibration, and its use by the simulator."""

import dataclasses
import json

import pytest
import yaml
from compactbed.runtime.records import RunRecord, StepRecord, write_run, write_steps
from compactbed.scenarios.schema import METHOD_PRESETS, parse_scenario
from compactbed.simulator.costs import Calibration
from compactbed.simulator.model import Simulator, cluster_of
from compactbed.simulator.workload import workload_of

from .simulated import CALIB

DATA = dict(name="s", nodes=2, link={"rate_mbit": 50, "delay_ms": 5}, labels=8, steps=4, guidance=1.0,
            methods=["compact-1bit"], warmup={"mode": "local", "steps": 1}, seeds=[0, 1])


def _step_rows(run, launch_job, share, factor, later, next_extra=0.0, synchronous=1, world=4, host_factor=1.0):
    """Compute rows (as measured, with their host factor) of one run: a local step whose slowest rank takes
    ``factor`` x the modelled compute, then ``next_extra`` more in step 1 than the later steps' ``later`` s."""
    dev, layers, tokens = CALIB.devices["cpu"], 4, 1024
    modelled = layers * dev.layer_seconds(tokens, tokens, 64, share)
    walls = [factor * modelled * host_factor, (later + next_extra) * host_factor, later * host_factor,
             later * host_factor]
    rows = []
    for step, wall in enumerate(walls):
        for rank in range(world):
            for layer in range(layers):
                rows.append(dict(run=run, rank=rank, step=step, layer=layer, world=world,
                                 tokens=tokens if step == 0 else tokens // world, kv_tokens=tokens, hidden=64,
                                 share=share, seconds=0.001, wall_s=wall * (1 if rank == 0 else 0.5),
                                 launch_job=launch_job, synchronous=synchronous, layers=layers,
                                 host_factor=host_factor))
    return rows


def test_kept_local_step_prices_what_the_step_adds_and_is_not_led_by_outliers():
    from compactbed.simulator.fit import fit_kept_local_step, fit_local_step
    from compactbed.simulator.points import kept_local_steps

    dev = CALIB.devices["cpu"]
    pts = []
    for k in range(5):          # the step itself 1.0x, the next step waits 0.6x more: it adds 1.6x
        modelled = 4 * dev.layer_seconds(1024, 1024, 64, 2.0)
        pts += _step_rows(f"kept{k}", 1 + k, 2.0, 1.0, 0.3, next_extra=0.6 * modelled, host_factor=1 + k / 10)
    pts += _step_rows("lossy", 3, 2.0, 1.0, 0.3, next_extra=50.0)       # one step held up by a loss: ignored
    pts += _step_rows("fresh", 0, 2.0, 2.5, 0.3)                          # the launch's first job
    pts += _step_rows("async", 2, 2.0, 9.0, 0.3, synchronous=0)          # DistriFusion
    rows = kept_local_steps(pts)
    assert sorted(r["run"] for r in rows) == ["kept0", "kept1", "kept2", "kept3", "kept4", "lossy"]
    f0, f1 = fit_kept_local_step(rows, dev)
    assert f0 == pytest.approx(1.6, rel=1e-6) and f1 == 0.0
    assert fit_kept_local_step([], dev) is None
    # the fresh-process factor is fitted on the first jobs alone, on the step's slowest rank as before
    assert fit_local_step(pts, dev) == pytest.approx((2.5, 0.0), abs=1e-6)


def _results_folder(root, launch_jobs, logs=("shaped/launcher0.log",), record=True):
    """A results folder of compact-1bit with a local warmup step, one seed per entry of ``launch_jobs``; run.json
    records each job's place in its launch unless ``record`` is False (an older runtime's folder)."""
    folder = root / "res"
    scenario = parse_scenario(DATA, "s")
    data = scenario.model_dump(mode="json")
    (folder / "shaped").mkdir(parents=True)
    (folder / "scenario.yaml").write_text(yaml.safe_dump(data))
    for log in logs:
        (folder / log).write_text("")
    method = METHOD_PRESETS["compact-1bit"]
    w = workload_of(scenario, method)
    rows, done = [], []
    for seed, position in enumerate(launch_jobs):
        run = folder / "shaped" / "compact-1bit" / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "job.json").write_text(json.dumps({"scenario": data, "method": method.model_dump()}))
        write_run(run / "run.json", RunRecord(method=method.model_dump(), seed=seed, world=2, degrees=(1, 2),
                                              latency_s=1.0, warmup_steps=1, warmup_mode="local", codec_backend="",
                                              base_consistency={}, torch="", device="cpu",
                                              launch_job=position if record else None))
        full = CALIB.devices["cpu"].layer_seconds(w.batch * w.tokens, w.batch * w.tokens, w.shape.hidden, 1.0)
        for rank in range(2):
            write_steps(run / f"rank{rank}.jsonl", [StepRecord(
                rank=rank, step=k, warmup="local" if k == 0 else None,
                wall_s=(1.5 * w.shape.layers * full) if k == 0 else 0.05, comm_wait_s=0.0, codec_s=0.0,
                compute_s=0.0, bytes_sent=0, bytes_uncompressed=0, exchanges=0,
                layer_compute_s={str(i): full if k == 0 else full / 2 for i in range(w.shape.layers)})
                for k in range(4)])
        rows.append(dict(method="compact-1bit", seed=seed, links="shaped", status="ok", latency_s=1.0,
                         launch_job=position if record else None))
        done.append(f"shaped/compact-1bit/seed{seed}")
    (folder / "summary.json").write_text(json.dumps({"rows": rows, "state": {"state": "complete",
                                                                              "methods_done": done}}))
    return folder


def test_older_folders_get_each_jobs_place_in_its_launch_from_the_order_run(tmp_path):
    from compactbed.simulator.runs import MeasuredRun, inferred_launch_jobs

    one = _results_folder(tmp_path / "one", [0, 1], record=False)
    assert inferred_launch_jobs(one) == {"shaped/compact-1bit/seed0": 0, "shaped/compact-1bit/seed1": 1}
    assert [r.launch_job for r in MeasuredRun.from_folder(one).rows] == [0, 1]
    relaunched = _results_folder(tmp_path / "re", [0, 1], logs=("shaped/launcher0.log",
                                                                 "shaped/relaunch1-launcher0.log"), record=False)
    assert inferred_launch_jobs(relaunched) == {}          # which jobs were relaunched is not known
    no_logs = _results_folder(tmp_path / "old", [0, 1], logs=(), record=False)
    assert inferred_launch_jobs(no_logs) == {}             # a launch per job, before ranks were kept
    assert [r.launch_job for r in MeasuredRun.from_folder(no_logs).rows] == [None, None]


def test_simulator_prices_the_local_step_by_whether_its_processes_are_fresh(tmp_path):
    from compactbed.simulator.predict import measured_cases

    dev = dataclasses.replace(CALIB.devices["cpu"], local_step_factor=(3.0, 0.0), kept_local_step_factor=(1.5, 0.0))
    calib = dataclasses.replace(CALIB, devices={"cpu": dev})
    scenario = parse_scenario(DATA, "s")
    w = workload_of(scenario, METHOD_PRESETS["compact-1bit"])
    kept, fresh = (Simulator(w, dataclasses.replace(cluster_of(scenario), fresh_processes=f), calib)
                   for f in (False, True))
    assert fresh.layer_compute(0, True) == pytest.approx(2 * kept.layer_compute(0, True))
    assert fresh.layer_compute(0, False) == kept.layer_compute(0, False)
    older = dataclasses.replace(calib, devices={"cpu": dataclasses.replace(dev, kept_local_step_factor=None)})
    assert Simulator(w, cluster_of(scenario), older).layer_compute(0, True) == fresh.layer_compute(0, True)
    # a case is fresh where most of its seeds were their launch's first job, or ran before ranks were kept
    for name, jobs, logs, expected in (("kept", [0, 4], ["shaped/launcher0.log"], False),
                                       ("fresh", [0, 0], ["shaped/launcher0.log"], True),
                                       ("older", [2, 6], [], True)):
        folder = _results_folder(tmp_path / name, jobs, logs=logs, record=name != "older")
        (case,) = measured_cases([folder], "cpu", calib)
        assert case.cluster.fresh_processes is expected, name


def test_local_step_is_fitted_into_a_calibration_leaving_the_rest(tmp_path):
    from compactbed.simulator.calibrate import local_step_into

    into = tmp_path / "calib"
    CALIB.save(into)
    folder = _results_folder(tmp_path, [0, 1, 2])           # seeds 1 and 2 ran in kept processes
    f0, f1 = local_step_into([folder], into, log=lambda s: None)
    assert f1 == 0.0 and f0 == pytest.approx(1.5, rel=1e-6)   # the step's 1.5x; the next step waits for nothing
    again = Calibration.load(into)
    assert again.devices["cpu"].kept_local_step_factor == pytest.approx((f0, f1))
    assert dataclasses.replace(again.devices["cpu"], kept_local_step_factor=None) == CALIB.devices["cpu"]
    assert dataclasses.replace(again, devices=CALIB.devices) == CALIB
    assert len((into / "local_steps.csv").read_text().splitlines()) == 3        # header + 2 kept runs
    assert local_step_into([folder], into, log=lambda s: None) == pytest.approx((f0, f1))   # not counted twice
    assert len((into / "local_steps.csv").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="not a calibration folder"):
        local_step_into([folder], tmp_path / "res", log=lambda s: None)
