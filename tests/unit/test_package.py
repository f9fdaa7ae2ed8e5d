"""What the wheel ships: prediction works from the simulator files listed as package data alone, and the measured
points the calibration was fitted on are not among them."""

import shutil
import tomllib
from pathlib import Path

from compactbed.scenarios.schema import load_scenario
from compactbed.simulator.costs import DATA_DIR, Calibration
from compactbed.simulator.hardware import PROFILES_DIR
from compactbed.simulator.predict import predict

ROOT = Path(__file__).parents[2]


def test_prediction_needs_only_the_shipped_simulator_files(tmp_path):
    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [f for pattern in shipped["compactbed.simulator"] for f in (ROOT / "simulator").glob(pattern)]
    assert {"devices.yaml", "links.yaml", "published.yaml"} <= {f.name for f in files if f.parent == PROFILES_DIR}
    files = [f for f in files if f.parent != PROFILES_DIR]
    assert all(f.is_file() and f.parent == DATA_DIR for f in files)
    assert sum(f.stat().st_size for f in files) < 100_000              # not the 13 MB of points and runs
    assert not {"compute.csv", "hops.csv", "runs.json"} & {f.name for f in files}
    for f in files:
        shutil.copy(f, tmp_path / f.name)
    scenario = load_scenario(ROOT / "scenarios" / "edge_4node.yaml")
    alone, _ = predict(scenario, Calibration.load(tmp_path))
    full, _ = predict(scenario, Calibration.load(DATA_DIR))
    assert [r.latency_s for r in alone] == [r.latency_s for r in full] and all(r.latency_s > 0 for r in alone)
