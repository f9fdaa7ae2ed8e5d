"""Calibration: each fitter recovers known constants from synthetic points, calibrate writes files that
round-trip and can be refitted alone, the host factor and leave-one-out behave as stated."""

import math
from pathlib import Path

import pytest
from compactbed.runtime.records import RunRecord, StepRecord, write_run, write_steps
from compactbed.scenarios.schema import METHOD_PRESETS, parse_scenario
from compactbed.simulator.costs import HOP_PARAMS, Calibration, DeviceProfile, hop_seconds
from compactbed.simulator.fit import fit_hops
from compactbed.simulator.model import Simulator, cluster_of
from compactbed.simulator.workload import workload_of

from .simulated import CALIB


def test_hop_fit_recovers_known_parameters():
    truth = (1.2, 1.05, 0.004, 1.5, 3e5, 0.7, 2.5, 0.6, 3.0, 1 / 40e6, 0.003, 1.3)
    pts = []
    rate, burst = 12.5e6, 40_000
    for rtt in (0.004, 0.02, 0.06):
        for kv in (0, 20_000, 60_000, 2.5e6, 12.5e6):
            for bidir, jitter, loss, fwd, over in ((0, 0, 0, 0, 0), (1, 0, 0, 0, 0), (0, 0.002, 0.005, 4, 1),
                                                   (0, 0.004, 0, 0, 1), (0, 0, 0.001, 0, 0), (0, 0, 0.0002, 8, 3)):
                hop = lambda nb: hop_seconds(truth, rtt, nb, rate, bidir, jitter, loss, burst, fwd, over)  # noqa: E731
                comm = 12 * hop(kv) + 3 * hop(12_000)
                imbalance = 0.01 * (len(pts) % 3)        # waiting for a slower rank's compute, not for the link
                pts.append(dict(rtt_s=rtt, kv_hops=12, kv_bytes=kv, out_hops=3, out_bytes=12_000, rate_bytes=rate,
                                bidirectional=bidir, jitter_s=jitter, loss=loss, burst_bytes=burst, forwarding=fwd,
                                oversubscription=over, comm_wait_s=float(comm) + imbalance, imbalance_s=imbalance))
    fit = fit_hops(pts)
    forwarding = HOP_PARAMS.index("forwarding_s_per_byte")
    assert all(math.isclose(f, t, rel_tol=0.02, abs_tol=2e-4) for k, (f, t) in enumerate(zip(fit, truth))
               if k != forwarding), fit
    assert fit[forwarding] == pytest.approx(truth[forwarding], rel=0.02)


def test_hop_fit_is_not_led_by_a_few_steps_whose_wait_was_for_compute():
    """Steps whose wait was all for a slower rank's compute (nothing left for the links) are left out, and steps whose
    transfers hid behind compute (a tenth of the modelled time measured) do not pull the fit: with 4% of those, it
    still recovers the parameters (relative errors, even under a soft-L1 loss, ended at the bounds here)."""
    truth = (1.2, 1.0, 0.002, 1.5, 3e5, 0.5, 1.22, 0.0, 0.0, 0.0, 0.0, 1.3)
    pts = []
    for rtt in (0.004, 0.02, 0.06):
        for kv in (20_000, 60_000, 500_000, 2.5e6):
            for bidir in (0, 1):
                for rate in (5e6, 12.5e6, 40e6):
                    hop = lambda nb: hop_seconds(truth, rtt, nb, rate, bidir)  # noqa: E731
                    comm = float(12 * hop(kv) + 3 * hop(12_000))
                    pts.append(dict(rtt_s=rtt, kv_hops=12, kv_bytes=kv, out_hops=3, out_bytes=12_000, rate_bytes=rate,
                                    bidirectional=bidir, comm_wait_s=comm, imbalance_s=0.0))
    for k in range(0, len(pts), 33):                 # hidden behind compute: a tenth of the modelled time
        pts[k] = pts[k] | {"comm_wait_s": pts[k]["comm_wait_s"] / 10}
    pts.append(pts[1] | {"imbalance_s": pts[1]["comm_wait_s"] + 0.015})     # waited only for compute
    fit = fit_hops(pts)
    assert all(math.isclose(fit[k], truth[k], rel_tol=0.05) for k in (0, 1, 3, 11)), fit


def test_compute_is_fitted_on_each_layers_slowest_rank():
    """Synchronous steps: the exchange waits for each layer's slowest rank, so that is what the profile fits, small
    and large shapes alike (relative error); local warmup steps (cold, every rank busy) do not pull it."""
    from compactbed.simulator.fit import fit_compute

    truth = DeviceProfile(a=2e-3, b=1e-9, c=4e-12, cores=2)
    pts = []
    for run, world, tokens in (("a", 2, 500), ("b", 2, 4000), ("c", 4, 1000), ("d", 4, 3000)):
        share = max(1.0, world / 2)
        pace = truth.layer_seconds(tokens, world * tokens, 64, share)
        for rank in range(world):
            for step in range(3):
                for layer in range(4):
                    slower = rank == (step + layer) % world              # a different rank is the slowest each time
                    pts.append(dict(run=run, rank=rank, step=step, layer=layer, world=world, tokens=tokens,
                                    kv_tokens=world * tokens, hidden=64, share=share,
                                    seconds=pace if slower else 0.7 * pace))
            pts.append(dict(run=run, rank=rank, step=9, layer=0, world=world, tokens=world * tokens,
                            kv_tokens=world * tokens, hidden=64, share=share, seconds=50.0))     # a local step
    fit = fit_compute(pts, cores=2)
    for tokens, world in ((500, 2), (4000, 2), (1000, 4), (3000, 4), (2000, 4)):
        share = max(1.0, world / 2)
        assert fit.layer_seconds(tokens, world * tokens, 64, share) == pytest.approx(
            truth.layer_seconds(tokens, world * tokens, 64, share), rel=1e-3)


def test_local_step_factor_is_fitted_on_the_slowest_rank():
    from compactbed.simulator.fit import fit_local_step

    dev = DeviceProfile(a=0.0, b=1e-9, c=0.0, cores=2)
    pts = []
    for run, world in (("a", 2), ("b", 4), ("c", 4)):
        share = max(1.0, world / 2)
        for rank in range(world):
            slow = 1.0 + (0.3 + 0.5 * (share - 1)) * (rank == world - 1)     # only the last rank is slower
            modeled = share * dev.b * 1000 * 64 ** 2
            for layer in range(4):
                pts.append(dict(run=run, rank=rank, step=0, layer=layer, world=world, tokens=1000, kv_tokens=1000,
                                hidden=64, share=share, seconds=modeled, wall_s=4 * modeled * slow))
                pts.append(dict(run=run, rank=rank, step=1, layer=layer, world=world, tokens=250, kv_tokens=1000,
                                hidden=64, share=share, seconds=modeled, wall_s=99.0))       # not a local step
    f0, f1 = fit_local_step(pts, dev)
    assert f0 == pytest.approx(1.3, rel=1e-6) and f1 == pytest.approx(0.5, rel=1e-6)


def test_codec_call_cost_is_fitted_on_the_runs_codec_time():
    """A run's codec time = the kernel bench's cost of its bytes + a fixed cost per call (K and V apiece, one
    encode and world-1 decodes per layer); warm-up steps and rows without a codec do not count."""
    import copy

    from compactbed.simulator.fit import fit_codec_call

    call = 3e-4
    pts = []
    for run, world, raw in (("a", 2, 200_000), ("b", 4, 400_000), ("c", 4, 100_000)):
        per_layer = CALIB.codec_seconds("1bit", "encode", raw) \
            + (world - 1) * CALIB.codec_seconds("1bit", "decode", raw)
        for rank in range(world):
            codec_s = 4 * (per_layer + 2 * world * call)
            pts.append(dict(run=run, rank=rank, step=1, world=world, layers=4, codec="1bit", kv_bytes=raw,
                            codec_s=codec_s))
            pts.append(dict(run=run, rank=rank, step=0, world=world, layers=4, codec="", kv_bytes=raw, codec_s=9.0))
    assert fit_codec_call(pts, CALIB) == pytest.approx(call, rel=1e-6)
    refit = copy.deepcopy(CALIB)             # a calibration that already has a call cost fits the same one
    refit.devices["cpu"].codec_call_s = 5 * call
    assert fit_codec_call(pts, refit) == pytest.approx(call, rel=1e-6)
    assert fit_codec_call([p for p in pts if not p["codec"]], CALIB) == 0.0
    dev = DeviceProfile(a=1e-4, b=1e-11, c=1e-11, cores=2, codec_call_s=call)
    with_calls = Calibration(devices={"cpu": dev}, codec=CALIB.codec)
    assert with_calls.codec_seconds("1bit", "decode", 1000) == pytest.approx(CALIB.codec_seconds("1bit", "decode", 1000) + 2 * call)


def test_validation_compares_with_the_median_of_repeats(tmp_path):
    import json

    import yaml
    from compactbed.simulator.predict import validate

    folder = tmp_path / "res"
    folder.mkdir()
    (folder / "scenario.yaml").write_text(yaml.safe_dump(dict(name="s", nodes=2, link={"rate_mbit": 50, "delay_ms": 5},
                                                              labels=8, steps=4, methods=["ring"], seeds=[0, 1, 2])))
    rows = [dict(method="ring", seed=k, links="shaped", status="ok", latency_s=t) for k, t in enumerate((10.0, 30.0, 11.0))]
    rows.append(dict(method="ring", seed=3, links="shaped", status="failed", latency_s=None))
    (folder / "summary.json").write_text(json.dumps({"rows": rows}))
    (case,) = validate([tmp_path], CALIB)
    assert (case.method, case.links, case.repeats, case.measured_s) == ("ring", "shaped", 3, 11.0)
    assert case.spread == pytest.approx(20 / 11)
    assert case.error == pytest.approx(case.predicted_s / 11.0 - 1)


def test_calibration_round_trip(tmp_path):
    CALIB.save(tmp_path)
    again = Calibration.load(tmp_path)
    assert again.devices["cpu"] == CALIB.devices["cpu"] and again.codec == CALIB.codec
    with pytest.raises(FileNotFoundError, match="scenario calibrate"):
        Calibration.load(tmp_path / "none")


def test_calibrate_from_link_benchmarks_and_an_earlier_calibration(tmp_path):
    """Without run hops, the hop model is fitted on micro-benchmark rows (links measured alone); an earlier
    calibration folder's compute rows are reused. With run hops too, the runs win and calibrate reports how
    much slower their communication is than the links alone."""
    import csv
    import shutil

    from compactbed.simulator.calibrate import calibrate
    from compactbed.simulator.costs import DATA_DIR
    from compactbed.testbed.linkbench import FIELDS

    shipped = Calibration.load(DATA_DIR)
    truth = (1.3, 0.95, 0.002, 1.4, 2e5, 0.5, 1.22, 0.8, 0.0, 0.0, 0.0, 1.2)
    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "linkbench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for world in (2, 4):
            for rate, delay in ((20, 2), (100, 10), (500, 20)):
                for n in (4096, 24_000, 48_000, 131072, 524288, 2097152):
                    rate_b = rate * 1e6 / 8 * shipped.link_efficiency * 1448 / 1514
                    hop = hop_seconds(truth, 2 * (delay / 1e3 + shipped.link_overhead_s), n, rate_b, int(world == 2),
                                      burst=max(32_000, rate * 1000 / 8))
                    w.writerow(dict(world=world, rate_mbit=rate, delay_ms=delay, jitter_ms=0, loss_pct=0, bytes=n,
                                    hops=world - 1, reps=3, seconds=(world - 1) * float(hop)))
    no_hops = tmp_path / "earlier"
    no_hops.mkdir()
    for name in ("compute.csv", "links.csv", "calibration.json"):
        shutil.copy(DATA_DIR / name, no_hops / name)
    calib = calibrate([no_hops, bench], tmp_path / "out", log=lambda s: None)
    fitted = tuple(getattr(calib, n) for n in HOP_PARAMS)
    assert all(math.isclose(f, t, rel_tol=0.02, abs_tol=2e-4) for f, t in zip(fitted, truth)), fitted
    assert calib.devices["cpu"].b == pytest.approx(shipped.devices["cpu"].b, rel=1e-6)   # same compute rows
    assert calib.sources == shipped.sources + [str(bench)]
    assert calib.async_transfer_factor == shipped.async_transfer_factor    # no DistriFusion runs to refit it

    said = []
    rows_only = tmp_path / "rows"          # the shipped rows without its measured runs (no refinement: quick)
    shutil.copytree(DATA_DIR, rows_only, ignore=shutil.ignore_patterns("runs.json"))
    with_runs = calibrate([rows_only, bench], tmp_path / "out2", log=said.append)
    runs_only = calibrate([rows_only], tmp_path / "out3", log=lambda s: None)
    assert [getattr(with_runs, n) for n in HOP_PARAMS] == [getattr(runs_only, n) for n in HOP_PARAMS]
    assert any("x (median) what the links alone cost" in line for line in said), said


def test_hop_parameters_refined_on_whole_runs_reproduce_their_latency(tmp_path):
    """The whole-run refinement moves the free hop parameters until the simulated latencies match the measured
    ones (here measured = simulated with a known round-trip factor); the other parameters stay put."""
    import copy
    import json

    import yaml
    from compactbed.simulator.costs import HOP_PARAMS
    from compactbed.simulator.fit import refine_hops_on_runs

    truth = copy.deepcopy(CALIB)
    truth.hop_rtt_factor = 1.6
    data = dict(name="s", nodes=4, link={"rate_mbit": 50, "delay_ms": 8}, labels=8, steps=4,
                methods=["ring", "compact-1bit"], seeds=[0, 1])
    folder = tmp_path / "res"
    folder.mkdir()
    scenario = parse_scenario(data, "s")
    (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json")))   # as a run records it
    truth_s = {m: Simulator(workload_of(scenario, METHOD_PRESETS[m]), cluster_of(scenario), truth).run().latency_s
               for m in ("ring", "compact-1bit")}
    rows = [dict(method=m, seed=k, links="shaped", status="ok", latency_s=truth_s[m]) for m in truth_s for k in (0, 1)]
    (folder / "summary.json").write_text(json.dumps({"rows": rows}))
    calib = copy.deepcopy(CALIB)
    free = [name == "hop_rtt_factor" for name in HOP_PARAMS]
    assert refine_hops_on_runs([tmp_path], calib, free) == 2
    assert calib.hop_rtt_factor == pytest.approx(1.6, rel=1e-3)
    assert calib.hop_bandwidth_factor == CALIB.hop_bandwidth_factor
    assert refine_hops_on_runs([tmp_path / "none"], calib) == 0


def test_earlier_calibration_rows_of_runs_given_raw_are_not_counted_twice():
    from compactbed.simulator.costs import DATA_DIR
    from compactbed.simulator.points import earlier_points
    from compactbed.simulator.points import read_csv as _read_csv

    shipped = _read_csv(DATA_DIR / "hops.csv")
    one_run = shipped[0]["run"]
    fresh = [r for r in shipped if r["run"] == one_run]
    kept = earlier_points([DATA_DIR], "hops.csv", fresh)
    assert len(kept) == len(shipped) - len(fresh) and all(r["run"] != one_run for r in kept)
    assert len(earlier_points([DATA_DIR], "hops.csv")) == len(shipped)


def _results_folder(tmp_path, name, data, layer_scale, reference_s, threads=1):
    """A results folder of one ring run (2 ranks, one synchronous step) whose layer times are ``layer_scale`` x
    CALIB's model, with a single-process reference generation of ``reference_s`` on ``threads`` threads."""
    import json

    import yaml

    dev = CALIB.devices["cpu"]
    w = workload_of(parse_scenario(data, "s"), METHOD_PRESETS["ring"])
    folder = tmp_path / name
    run = folder / "shaped" / "ring" / "seed0"
    run.mkdir(parents=True)
    data = parse_scenario(data, "s").model_dump(mode="json")          # as a run records it
    (folder / "scenario.yaml").write_text(yaml.safe_dump(data))
    rows = [dict(method="ring", seed=0, links="shaped", status="ok", latency_s=10.0)]
    (folder / "summary.json").write_text(json.dumps({"rows": rows, "reference_latency_s": {"0": reference_s},
                                                     "reference_threads": threads}))
    (run / "job.json").write_text(json.dumps({"scenario": data, "method": METHOD_PRESETS["ring"].model_dump()}))
    write_run(run / "run.json", RunRecord(method=METHOD_PRESETS["ring"].model_dump(), seed=0, world=2, degrees=(1, 2),
                                          latency_s=10.0, warmup_steps=0, warmup_mode="local", codec_backend="",
                                          base_consistency={}, torch="", device="cpu"))
    for rank in range(2):
        layers = {str(k): layer_scale * dev.layer_seconds(w.local_tokens, w.batch * w.tokens, w.shape.hidden, 1.0)
                  for k in range(w.shape.layers)}
        write_steps(run / f"rank{rank}.jsonl", [StepRecord(
            rank=rank, step=0, warmup=None, wall_s=1.0, comm_wait_s=0.0, codec_s=0.0, compute_s=sum(layers.values()),
            bytes_sent=0, bytes_uncompressed=0, exchanges=0, layer_compute_s=layers)])
    return folder


def test_a_calibration_keeps_its_runs_so_it_can_be_refitted_and_cross_validated_alone(tmp_path):
    """calibrate stores the measured runs it was fitted on (runs.json): refitting from the calibration folder alone
    refines on them as on the raw folders, and leaving one stored run out fits what the other raw folders fit."""
    from compactbed.simulator.calibrate import calibrate
    from compactbed.simulator.costs import HOP_PARAMS
    from compactbed.simulator.crossval import fit_without, leave_one_out
    from compactbed.simulator.points import read_csv as _read_csv
    from compactbed.simulator.runs import read_runs

    folders = [_results_folder(tmp_path / "raw", f"r{k}", dict(name=f"s{k}", nodes=2, labels=8, steps=2,
                               link={"rate_mbit": 50, "delay_ms": delay}, methods=["ring"]), 1.0, 0.2)
               for k, delay in enumerate((2, 10, 30))]
    codec = _read_csv(Path(__file__).parents[2] / "simulator" / "data" / "codec.csv")
    first = calibrate(folders, tmp_path / "cal", log=lambda s: None, codec_rows=codec)
    stored = read_runs([tmp_path / "cal"])
    assert [r.folder for r in stored] == list(map(str, folders))
    assert [r.rows for r in stored] == [r.rows for r in read_runs(folders)]
    said = []
    again = calibrate([tmp_path / "cal"], tmp_path / "again", log=said.append, codec_rows=codec)
    assert any("refined on 3 whole runs" in line for line in said), said
    assert [getattr(again, n) for n in HOP_PARAMS] == pytest.approx([getattr(first, n) for n in HOP_PARAMS])
    left_out = str(folders[1])
    alone = fit_without([tmp_path / "cal"], {left_out})
    raw = calibrate([folders[0], folders[2]], tmp_path / "raw02", log=lambda s: None, codec_rows=codec)
    assert left_out not in alone.sources and len(alone.sources) == 2
    assert [getattr(alone, n) for n in HOP_PARAMS] == pytest.approx([getattr(raw, n) for n in HOP_PARAMS])
    folds = dict(leave_one_out([tmp_path / "cal"]))
    assert set(folds) == set(map(str, folders))
    (case,) = folds[left_out]
    assert case.predicted_s == pytest.approx(validate_one(stored[1], alone))


def validate_one(run, calib) -> float:
    from compactbed.simulator.predict import validate

    (case,) = validate([run], calib)
    return case.predicted_s


def test_host_factor_follows_the_single_process_reference_and_scales_predicted_compute(tmp_path):
    """A run whose one-thread reference generation took 1.5x the calibration runs' (relative to the model) gets
    host factor 1.5 and its predicted compute scales by it; a reference on more threads, or a calibration without
    a reference pace, gives none."""
    import dataclasses

    from compactbed.simulator.points import host_factors, reference_pace
    from compactbed.simulator.predict import validate
    from compactbed.simulator.runs import read_runs

    data = dict(name="s", nodes=2, link={"rate_mbit": 50, "delay_ms": 5}, labels=8, steps=2, methods=["ring"])
    base = _results_folder(tmp_path / "a", "base", data, 1.0, 0.2)
    slow = _results_folder(tmp_path / "b", "slow", data, 1.0, 0.3)
    threads = _results_folder(tmp_path / "c", "threads", data, 1.0, 0.3, threads=2)
    dev = dataclasses.replace(CALIB.devices["cpu"])
    dev.reference_pace = reference_pace(read_runs([base])[0], dev)
    runs = read_runs([base, slow, threads])
    assert host_factors(runs, dev) == {str(base): pytest.approx(1.0), str(slow): pytest.approx(1.5)}
    assert host_factors(runs, CALIB.devices["cpu"]) == {}
    calib = dataclasses.replace(CALIB, devices={"cpu": dev})
    (at_base,), (at_slow,) = validate([tmp_path / "a"], calib), validate([tmp_path / "b"], calib)
    assert at_slow.host_factor == pytest.approx(1.5) and at_base.host_factor == pytest.approx(1.0)
    w = workload_of(parse_scenario(data, "s"), METHOD_PRESETS["ring"])
    slower = Simulator(w, dataclasses.replace(cluster_of(parse_scenario(data, "s")), compute_scale=(1.5, 1.5)), CALIB)
    assert at_slow.predicted_s == pytest.approx(slower.run().latency_s)
    assert at_slow.predicted_s > at_base.predicted_s


def test_a_disturbed_reference_generation_is_left_out_of_the_host_pace():
    """The reference generation is the same deterministic work each seed: timings that agree give their median,
    one far slower than the fastest (held_prof_k's wan run: 0.93 s then 0.098 s) is left out, not averaged in."""
    from compactbed.simulator.points import DISTURBED, undisturbed

    assert undisturbed([0.30, 0.33]) == pytest.approx(0.315)
    assert undisturbed([0.9274, 0.0983]) == pytest.approx(0.0983)
    assert undisturbed([0.2, 0.21, 0.2 * DISTURBED * 1.01]) == pytest.approx(0.205)
    assert undisturbed([0.2, 0.21, 0.2 * DISTURBED]) == pytest.approx(0.21)


def test_compute_fit_takes_out_the_hosts_drift(tmp_path):
    """Three runs of one shape on a host at 1.0x, 1.2x and 1.5x the model's time (layers and reference generation
    alike): with host factors every run's rows agree, and the profile is the median host's; stored with the rows,
    the factors make a refit from the rows alone (no results folders) the same."""
    from compactbed.simulator.fit import fit_compute_on_host
    from compactbed.simulator.points import compute_points
    from compactbed.simulator.runs import read_runs

    data = dict(name="s", nodes=2, link={"rate_mbit": 50, "delay_ms": 5}, labels=8, steps=2, methods=["ring"])
    folders = [_results_folder(tmp_path, f"h{k}", data, k, 0.2 * k) for k in (1.0, 1.2, 1.5)]
    points = compute_points(folders, 2)
    w = workload_of(parse_scenario(data, "s"), METHOD_PRESETS["ring"])
    shape = (w.local_tokens, w.batch * w.tokens, w.shape.hidden, 1.0)
    truth = 1.2 * CALIB.devices["cpu"].layer_seconds(*shape)
    device, scaled = fit_compute_on_host(points, 2, runs=read_runs(folders))
    assert device.layer_seconds(*shape) == pytest.approx(truth, rel=1e-3)
    assert all(p["seconds"] == pytest.approx(truth, rel=1e-3) for p in scaled)
    stored = [p | {"run": "elsewhere/" + p["run"], "host_factor": q["host_factor"]}     # folders gone
              for p, q in zip(points, scaled)]
    again, _ = fit_compute_on_host(stored, 2, earlier_pace=device.reference_pace)
    assert again.layer_seconds(*shape) == pytest.approx(device.layer_seconds(*shape), rel=1e-6)
    assert again.reference_pace == device.reference_pace


def _fit_on_names(results, exclude=frozenset()):
    """A stand-in fit whose calibration depends on exactly which folders it was given (picklable)."""
    import copy

    calib = copy.deepcopy(CALIB)
    calib.hop_rtt_factor = 1.0 + sum(int(Path(f).name[-1]) for f in results if str(f) not in exclude)
    return calib


def test_leave_one_out_predicts_each_folder_with_a_fit_that_never_saw_it(tmp_path):
    import json

    import yaml
    from compactbed.simulator.crossval import leave_one_out
    from compactbed.simulator.predict import validate

    folders = []
    for k, delay in enumerate((2, 10, 30)):
        folder = tmp_path / f"run{k + 1}"
        folder.mkdir()
        (folder / "scenario.yaml").write_text(yaml.safe_dump(dict(
            name=f"s{k}", nodes=2, link={"rate_mbit": 50, "delay_ms": delay}, labels=8, steps=4, methods=["ring"])))
        rows = [dict(method="ring", seed=0, links="shaped", status="ok", latency_s=5.0)]
        (folder / "summary.json").write_text(json.dumps({"rows": rows}))
        folders.append(folder)
    for workers in (1, 2):
        folds = dict(leave_one_out(folders, _fit_on_names, workers))
        assert set(folds) == set(map(str, folders))
        for folder in folders:
            others = [f for f in folders if f != folder]
            (case,) = folds[str(folder)]
            assert case.predicted_s == pytest.approx(validate([folder], _fit_on_names(others))[0].predicted_s)
            assert case.predicted_s != pytest.approx(validate([folder], _fit_on_names(folders))[0].predicted_s)
    with pytest.raises(ValueError, match="at least two"):
        list(leave_one_out(folders[:1], _fit_on_names))


def test_rtt_factors_recover_an_algorithms_round_trips_from_paired_micro_benchmarks(tmp_path):
    """Micro-benchmark rows made by the hop model, once with the calibration's round trips and once with 0.7x of
    them (another algorithm): the factor comes back, from the pairs alone; the recorded algorithm is read back."""
    import dataclasses
    import json

    from compactbed.simulator.fit import columns, comm_seconds, rtt_factors
    from compactbed.simulator.runs import congestion_in_force

    calib = dataclasses.replace(CALIB, congestion_control="bbr")
    other = dataclasses.replace(calib, hop_rtt_factor=0.7 * calib.hop_rtt_factor)
    rows = []
    for hops, rtt, nbytes in ((3, 0.01, 4096), (3, 0.02, 32768), (1, 0.004, 131072)):
        base = dict(kv_hops=hops, rtt_s=rtt, rate_bytes=12.5e6, jitter_s=0.0, loss=0.0, kv_bytes=nbytes, out_hops=0,
                    out_bytes=0, bidirectional=0, burst_bytes=0, forwarding=0, oversubscription=0.0)
        for cc, c in (("bbr", calib), ("reno", other)):
            rows.append(base | dict(congestion_control=cc,
                                    comm_wait_s=float(comm_seconds(c.hop_params(), columns([base]))[0])))
    assert rtt_factors(rows, calib) == {"reno": pytest.approx(0.7)}
    assert rtt_factors([r for r in rows if r["congestion_control"] == "reno"], calib) == {}
    assert congestion_in_force(tmp_path) == "host"
    (tmp_path / "environment.json").write_text(json.dumps({"congestion_control": {"in_force": "reno"}}))
    assert congestion_in_force(tmp_path) == "reno"


def test_a_runs_host_probe_is_read_with_it_and_reported_per_case(tmp_path):
    """The probe's slowdown is its median rank's; a run that recorded one reports it with each case (simcheck's
    co-run column) and is predicted as a run without one (the local step stays priced by the calibrated factor:
    held_prof_c judged the probe's pricing worse, see docs/VALIDATION.md). Its exchange rounds set the floor of
    every exchange (simcheck's exchange column)."""
    import json

    from compactbed.simulator.points import corun_factor, exchange_floor
    from compactbed.simulator.predict import validate

    assert corun_factor({"ranks": 3, "alone_s": 0.1, "together_s": [0.3, 0.15, 0.2]}) == pytest.approx(2.0)
    assert corun_factor(None) is None and corun_factor({"alone_s": 0.1, "together_s": []}) is None
    rounds = [[0.020, 0.030], [0.025, 0.031], [0.020, 0.028]]          # median round adds 8 ms over 4 hops
    assert exchange_floor({"exchange_rounds": rounds, "exchanges": 4}) == pytest.approx(0.002)
    with_rounds_to_all = [r + [0.05] for r in rounds]                      # held_prof_p's probes: a third column
    assert exchange_floor({"exchange_rounds": with_rounds_to_all, "exchanges": 4}) == pytest.approx(0.002)
    assert exchange_floor({"exchange_rounds": [[0.03, 0.02]], "exchanges": 4}) == 0.0
    assert exchange_floor({"ranks": 2, "alone_s": 0.1, "together_s": [0.2, 0.2]}) is None
    data = dict(name="s", nodes=2, link={"rate_mbit": 50, "delay_ms": 5}, labels=8, steps=3, methods=["ring"],
                warmup={"mode": "local", "steps": 1})
    plain = _results_folder(tmp_path, "plain", data, 1.0, 0.2)
    probed = _results_folder(tmp_path, "probed", data, 1.0, 0.2)
    summary = json.loads((probed / "summary.json").read_text())
    probe = {"ranks": 2, "calls": 5, "alone_s": 0.01, "together_s": [0.017, 0.019]}
    (probed / "summary.json").write_text(json.dumps(summary | {"corun": probe}))
    (with_probe,), (without,) = validate([probed], CALIB), validate([plain], CALIB)
    assert with_probe.corun == pytest.approx(1.8) and without.corun is None
    assert with_probe.predicted_s == without.predicted_s and with_probe.exchange_floor_s is None
    # its exchange rounds: 0.2 s more per forward of 4 hops = a 50 ms floor, above this link's hop: priced
    probe |= {"exchange_rounds": [[0.02, 0.22]] * 3, "exchanges": 4}
    (probed / "summary.json").write_text(json.dumps(summary | {"corun": probe}))
    (floored,) = validate([probed], CALIB)
    assert floored.exchange_floor_s == pytest.approx(0.05) and floored.predicted_s > without.predicted_s


def test_async_factor_is_fitted_into_a_calibration_leaving_the_rest(tmp_path):
    """``scenario calibrate --async-into``: DistriFusion's async transfer factor alone is refitted on the runs given
    and those stored in the calibration (measured = simulated with a known factor), leaving out runs of its earlier
    refresh, whose DistriFusion cases no check or fit uses; hop constants and stored runs stay; the folders it came
    from are recorded; a folder with no DistriFusion run, or that is not a calibration, is refused."""
    import dataclasses
    import json

    import yaml
    from compactbed.simulator.calibrate import async_into
    from compactbed.simulator.predict import measured_cases
    from compactbed.simulator.runs import read_runs, write_runs

    def folder_of(name, methods, truth):
        folder = tmp_path / name
        folder.mkdir()
        scenario = parse_scenario(dict(name=name, nodes=2, link={"rate_mbit": 50, "delay_ms": 8}, labels=8, steps=4,
                                       methods=methods, seeds=[0, 1]), name)
        (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
        rows = [dict(method=m, seed=k, links="shaped", status="ok", latency_s=Simulator(
            workload_of(scenario, METHOD_PRESETS[m]), cluster_of(scenario), truth).run().latency_s)
            for m in methods for k in (0, 1)]
        (folder / "summary.json").write_text(json.dumps({"rows": rows}))
        return folder

    into = tmp_path / "calib"
    CALIB.save(into)
    (older,) = read_runs([folder_of("older", ["distrifusion", "ring"], dataclasses.replace(CALIB,
                                                                                        async_transfer_factor=2.0))])
    older.distrifusion_alternated = True
    write_runs(into, [older])
    assert [c.method for c in measured_cases([into])] == ["ring"]
    truth = dataclasses.replace(CALIB, async_transfer_factor=0.6)
    with pytest.raises(ValueError, match="no DistriFusion run"):
        async_into([folder_of("rings", ["ring"], truth)], into, log=lambda s: None)
    df = folder_of("df", ["distrifusion", "ring"], truth)
    assert async_into([df], into, log=lambda s: None) == pytest.approx(0.6, rel=1e-3)
    again = Calibration.load(into)
    assert again.async_transfer_factor == pytest.approx(0.6, rel=1e-3) and again.async_sources == [str(df)]
    assert dataclasses.replace(again, async_transfer_factor=CALIB.async_transfer_factor, async_sources=[],
                               devices=CALIB.devices) == CALIB
    assert [r.folder for r in read_runs([into])] == [older.folder]
    with pytest.raises(ValueError, match="not a calibration folder"):
        async_into([df], tmp_path / "df", log=lambda s: None)


def test_rtt_factor_is_fitted_into_a_calibration_from_runs_under_another_algorithm(tmp_path):
    """``scenario calibrate --rtt-into``: the round trips per hop of an algorithm other than the calibration's are
    refitted on the whole runs made under it (measured = simulated with a known factor), runs under the calibration's
    own algorithm left out of it; every other constant stays, the folders it came from are recorded; a folder with
    no such run, or that is not a calibration, is refused."""
    import dataclasses
    import json

    import yaml
    from compactbed.simulator.calibrate import rtt_into

    def folder_of(name, algorithm, truth):
        folder = tmp_path / name
        folder.mkdir()
        scenario = parse_scenario(dict(name=name, nodes=2, link={"rate_mbit": 50, "delay_ms": 20}, labels=8, steps=4,
                                       methods=["ring", "compact-1bit"], seeds=[0, 1]), name)
        (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario.model_dump(mode="json")))
        (folder / "environment.json").write_text(json.dumps({"congestion_control": {"in_force": algorithm}}))
        cluster = dataclasses.replace(cluster_of(scenario), congestion_control=algorithm)
        rows = [dict(method=m.name, seed=k, links="shaped", status="ok", latency_s=Simulator(
            workload_of(scenario, m), cluster, truth).run().latency_s) for m in scenario.methods for k in (0, 1)]
        (folder / "summary.json").write_text(json.dumps({"rows": rows}))
        return folder

    into = tmp_path / "calib"
    CALIB.save(into)
    truth = dataclasses.replace(CALIB, rtt_factor_by_algorithm={"reno": 0.7})
    own = folder_of("own", CALIB.congestion_control, truth)
    with pytest.raises(ValueError, match="no run under a TCP algorithm other than"):
        rtt_into([own], into, log=lambda s: None)
    reno = folder_of("reno", "reno", truth)
    assert rtt_into([own, reno], into, log=lambda s: None)["reno"] == pytest.approx(0.7, rel=1e-3)
    again = Calibration.load(into)
    assert again.rtt_sources == {"reno": [str(reno)]}
    assert dataclasses.replace(again, rtt_factor_by_algorithm=CALIB.rtt_factor_by_algorithm, rtt_sources={},
                               devices=CALIB.devices) == CALIB
    with pytest.raises(ValueError, match="not a calibration folder"):
        rtt_into([reno], tmp_path / "reno", log=lambda s: None)
