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
    rows, _ = W.answer(W.WhatIf(method="cfg", guidance=1.5), CALIB)     # CFG parallel needs a guidance batch
    assert [r.method for r in rows] == ["cfg", "ring", "distrifusion"] and rows[0].latency_s < rows[1].latency_s


def test_flux_what_if_runs_on_a_gpu_profile():
    """Speed is the sweep benchmark's (python -m compactbed.simulator.bench sweep), not a timed test."""
    rows, _ = W.answer(W.WhatIf(model="flux.1-dev", resolution=1024, images=1, steps=28, nodes=8,
                                profile="ethernet_1g", device="l20"), CALIB)
    by = {r.method: r for r in rows}
    assert set(by) == {"compact-1bit", "ring", "distrifusion"}
    assert by["compact-1bit"].latency_s < by["ring"].latency_s and by["compact-1bit"].bytes_on_wire > 0


def test_gpu_what_ifs_take_the_machines_fabric_and_nic():
    """8 H100s in one NVLink machine against two machines of 4 over 25 GbE: the NIC makes ring slower; a name that
    is not a NIC is a message naming the shipped ones."""
    base = dict(model="flux.1-dev", resolution=1024, images=1, steps=28, nodes=8, profile="ethernet_1g",
                device="h100-sxm", intra_node="nvlink4", method="ring", warmup="sync")
    one = {r.method: r for r in W.answer(W.WhatIf(**base, gpus_per_node=8), CALIB)[0]}
    two = {r.method: r for r in W.answer(W.WhatIf(**base, gpus_per_node=4, inter_node="ethernet_25g"), CALIB)[0]}
    assert two["ring"].latency_s > 1.5 * one["ring"].latency_s
    assert "h100-sxm per machine over nvlink4" in W.profile_note(W.WhatIf(**base, gpus_per_node=8))
    with pytest.raises(ScenarioError, match="shipped: ethernet_10g"):
        W.answer(W.WhatIf(**base, gpus_per_node=4, inter_node="nvlink4"), CALIB)
    assert {"h100-sxm", "l20", "cpu"} <= {o["value"] for o in W.device_options(CALIB)}


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
    assert f.label == "res / 20260101-000000: ring, compact-1bit (complete)"
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


CONTROLS = ["nodes", "profile", "rate", "delay", "jitter", "loss", "model", "resolution", "images", "steps",
            "guidance", "method", "ulysses", "warmup", "device", "gpus", "intra", "inter"]


@pytest.mark.parametrize("control, value, says", [
    ("nodes", [1, 2], "nodes: Input should be a valid integer"), ("delay", "abc", "delay_ms: Input should be"),
    ("rate", 1e308, "rate_mbit: Input should be less than or equal to 400000"),
    ("images", {"a": 1}, "images: Input should be a valid integer"),
    ("method", "cfg", "only one pass per step"),
])
def test_a_malformed_control_posted_to_the_app_is_a_message_not_a_server_error(control, value, says):
    from compactbed.dashboards.app import create_app

    app = create_app([], CALIB)
    client = app.server.test_client()
    key = next(k for k in app.callback_map if "message.children" in k)
    values = dict(nodes=4, profile="edge_100m_10ms", rate=100, delay=10, jitter=0, loss=0, model="tiny_flux_mnist",
                  resolution=16, images=8, steps=4, guidance=1.0, method="compact-1bit", ulysses=1, warmup="local", device="cpu", gpus=1, intra="pcie4",
                  inter="ethernet_shaped")
    values[control] = value
    payload = {"output": key, "outputs": [{"id": s.split(".")[0], "property": s.split(".")[1]}
                                          for s in key.strip(".").split("...")],
               "inputs": [{"id": c, "property": "value", "value": values[c]} for c in CONTROLS],
               "changedPropIds": [f"{control}.value"], "state": []}
    reply = client.post("/_dash-update-component", json=payload)
    assert reply.status_code == 200
    assert says in reply.get_json()["response"]["message"]["children"]


def test_wide_clusters_answer_without_curves_and_profiles_say_what_they_model():
    w = W.WhatIf(model="flux.1-dev", resolution=1024, images=1, steps=28, nodes=64, profile="ethernet_1g",
                 device="l20")
    fig = W.bandwidth_curves(w, CALIB)
    assert not fig.data and "up to 16 nodes" in fig.layout.title.text
    assert "GPU cluster model" in W.profile_note(w)
    assert "emulation host" in W.profile_note(W.WhatIf(model="flux.1-dev", resolution=1024, device="cpu"))


def test_incomplete_and_loopback_folders_are_marked(folder):
    import json as _json

    (f,) = R.find_results([folder])
    summary = f.path / "summary.json"
    data = _json.loads(summary.read_text())
    summary.write_text(_json.dumps(data | {"state": {"state": "interrupted", "reason": "Ctrl-C", "owner_pid": 1}}))
    (f,) = R.find_results([folder])
    assert f.label.endswith("(interrupted)")
    fig, cases = R.predicted_vs_measured(f, CALIB)
    assert cases == [] and "interrupted" in fig.layout.title.text
    for r in data["rows"]:
        r["links"] = "loopback"
    summary.write_text(_json.dumps(data))
    (f,) = R.find_results([folder])
    assert f.passes == ["loopback"]
    fig, cases = R.predicted_vs_measured(f, CALIB)
    assert cases == [] and "no runs on emulated links" in fig.layout.title.text and "nan" not in fig.layout.title.text
