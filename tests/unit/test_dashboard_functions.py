"""The dashboard's pure functions: what-if answers and figures, results browsing, clear errors."""

import json

import numpy as np
import pytest
import yaml

from compactbed.dashboards import results as R
from compactbed.dashboards import whatif as W
from compactbed.simulator.costs import Calibration
from compactbed.scenarios.schema import ScenarioError

CALIB = Calibration.load()


def test_answer_reacts_to_the_link():
    slow = W.answer(W.WhatIf(profile="custom", rate_mbit=50, delay_ms=10), CALIB)[0]
    fast = W.answer(W.WhatIf(profile="custom", rate_mbit=10_000, delay_ms=0.05), CALIB)[0]
    by_slow, by_fast = {r.method: r for r in slow}, {r.method: r for r in fast}
    assert by_slow["ring"].latency_s > 2 * by_fast["ring"].latency_s
    assert by_slow["compact-1bit"].speedup_vs_uncompressed > by_fast["compact-1bit"].speedup_vs_uncompressed
    text = W.summary_text(slow, "compact-1bit")
    assert text["latency"].endswith(" s") and text["vs_ring"].endswith("x") and "MB" in text["bytes"]


def test_timeline_and_curves_have_data():
    w = W.WhatIf(nodes=4)
    rows, detail = W.answer(w, CALIB)
    tl = W.timeline_figure(detail, w.steps)
    assert {t.name for t in tl.data} == {"compute", "codec", "comm"} and len(tl.data[0].y) > 0
    curves = W.bandwidth_curves(w, CALIB)
    names = {t.name for t in curves.data}
    assert {"ring", "compact-1bit", "distrifusion"} <= names
    ring = next(t for t in curves.data if t.name == "ring")
    c1 = next(t for t in curves.data if t.name == "compact-1bit")
    assert all(abs(y - 1) < 1e-9 for y in ring.y) and c1.y[0] > c1.y[-1]   # compression pays most when slow


@pytest.mark.parametrize("bad, text", [
    (dict(nodes=0), "nodes"), (dict(nodes=3), "divide"), (dict(method="teleport"), "method"),
    (dict(model="gpt"), "model"), (dict(profile="custom", loss_pct=150), "loss_pct"), (dict(device="tpu"), "device"),
])
def test_bad_controls_give_a_message(bad, text):
    with pytest.raises(ScenarioError, match=text):
        W.answer(W.WhatIf(**bad), CALIB)


def test_usp_degrees_come_from_the_controls():
    rows, _ = W.answer(W.WhatIf(method="usp", ulysses_degree=2, warmup="sync"), CALIB)
    assert "usp" in {r.method for r in rows}
    with pytest.raises(ScenarioError, match="ulysses_degree"):
        W.answer(W.WhatIf(method="usp", ulysses_degree=3), CALIB)


def test_flux_what_if_runs_on_a_gpu_profile_quickly():
    import time

    t0 = time.perf_counter()
    rows, _ = W.answer(W.WhatIf(model="flux.1-dev", resolution=1024, images=1, steps=28, nodes=8,
                                profile="ethernet_1g", device="l20"), CALIB)
    assert time.perf_counter() - t0 < 1.0
    assert {r.method for r in rows} == {"compact-1bit", "ring", "distrifusion"}


@pytest.fixture
def folder(tmp_path):
    res = tmp_path / "res" / "20260101-000000"
    rows = []
    for m, lat, psnr in (("ring", 10.0, 140.0), ("compact-1bit", 3.0, 35.0)):
        d = res / "shaped" / m / "seed0"
        d.mkdir(parents=True)
        np.save(d / "images.npy", np.zeros((4, 1, 16, 16), np.float32))
        rows.append(dict(method=m, seed=0, links="shaped", status="ok", latency_s=lat, compute_s=1, comm_wait_s=2,
                         codec_s=0.1, bytes_on_wire=1e6, compression_ratio=1.0, quality={"psnr_db": psnr}))
    (res / "reference").mkdir()
    np.save(res / "reference" / "seed0.npy", np.zeros((4, 1, 16, 16), np.float32))
    (res / "summary.json").write_text(json.dumps({"rows": rows}))
    (res / "scenario.yaml").write_text(yaml.safe_dump(dict(name="t", nodes=4, labels=8, steps=4,
                                                          methods=["ring", "compact-1bit"])))
    return tmp_path / "res"


def test_results_browser_figures(folder):
    (f,) = R.find_results([folder])
    assert f.label.startswith("t / ")
    assert [t.name for t in R.latency_figure(f).data] == ["shaped"]
    assert len(R.breakdown_figure(f, "shaped").data) == 3
    par = R.pareto_figure(f, "shaped")
    assert list(par.data[0].y) == [60.0, 35.0]                # exact methods capped for display
    fig, cases = R.predicted_vs_measured(f, CALIB)
    assert {c.method for c in cases} == {"ring", "compact-1bit"} and all(c.predicted_s > 0 for c in cases)
    assert [t.name for t in fig.data] == ["measured", "predicted"] and "MAPE" in fig.layout.title.text
    samples = R.samples_figure(f, "shaped")
    assert len(samples.data) == 3                              # reference + two methods


def test_broken_folders_are_skipped(tmp_path):
    bad = tmp_path / "x" / "1"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text("{not json")
    assert R.find_results([tmp_path]) == []


def test_rgb_samples_show_as_colour_images(folder):
    """Pipeline folders give RGB images: they show as images, one strip per panel, colours kept."""
    (f,) = R.find_results([folder])
    rgb = np.full((4, 3, 16, 16), -1.0, np.float32)
    rgb[:, 0] = 1.0                                               # pure red
    for p in [f.path / "reference" / "seed0.npy", *f.path.glob("shaped/*/seed0/images.npy")]:
        np.save(p, rgb)
    fig = R.samples_figure(f, "shaped")
    assert [t.type for t in fig.data] == ["image"] * 3
    z = np.asarray(fig.data[0].z)
    assert z.shape == (16, 64, 3) and (z[..., 0] == 255).all() and (z[..., 1:] == 0).all()
