"""`scenario profile` measures this machine into profile files that predictions then use."""

import pytest
from compactbed.scenarios.schema import parse_scenario
from compactbed.simulator.gpu import efficiency
from compactbed.simulator.hardware import PATH_VARIABLE, read_devices, read_links, shipped
from compactbed.simulator.predict import predict
from compactbed.testbed.cli import main
from compactbed.testbed.profile import fit_collective

from .simulated import CALIB


def test_profile_writes_a_device_and_a_link_that_predictions_use(tmp_path, monkeypatch, capsys):
    assert main(["profile", "--name", "probe", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "peak" in out and "all-gather over 2 ranks (gloo)" in out and "codec 1bit" in out
    dev = read_devices(tmp_path / "probe.devices.yaml")["probe"]
    link = read_links(tmp_path / "probe.links.yaml")["probe-local"]
    assert dev.peak_tflops > 0 and dev.hbm_gbs > 0 and len(dev.measured) == 6
    assert 0.05 < dev.efficiency < 2.0
    small, large = (min(dev.measured, key=lambda p: (p.hidden, p.tokens)),
                    max(dev.measured, key=lambda p: (p.hidden, p.tokens)))
    assert large.seconds > 4 * small.seconds
    assert dict(dev.codec)["1bit/encode"] > 0 and link.busbw_gbs > 0 and link.latency_us > 0
    monkeypatch.setenv(PATH_VARIABLE, str(tmp_path))
    assert "probe" in shipped().devices and "probe-local" in shipped().links
    assert efficiency(shipped().devices["probe"], "flux.1-dev")[1].startswith("fitted to 6 measured blocks")
    sc = parse_scenario(dict(name="p", nodes=2, model={"name": "flux.1-dev"}, resolution=256, steps=2, labels=1,
                             methods=["ring", "compact-1bit"],
                             hardware={"device": "probe", "gpus_per_node": 2, "intra_node": "probe-local"}))
    rows = {r.method: r for r in predict(sc, CALIB)[0]}
    assert rows["ring"].latency_s > 0 and rows["compact-1bit"].codec_s > 0


def test_collective_fit_recovers_latency_and_bandwidth():
    rows = [(n, 3 * (20e-6 + n / 5e9)) for n in (1e3, 1e5, 1e7)]
    lat, bw = fit_collective(rows, 4)
    assert lat == pytest.approx(20e-6, rel=1e-6) and bw == pytest.approx(5e9, rel=1e-6)
