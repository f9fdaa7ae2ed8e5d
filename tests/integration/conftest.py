"""Helpers for multi-process runs: one method run of a small scenario, launched like `scenario run` does."""

import json
from pathlib import Path

import numpy as np
import pytest

from compactbed.runtime.engine import Job
from compactbed.runtime.models import load_for, load_model
from compactbed.runtime.sampling import sample_reference
from compactbed.testbed.launch import local_torchrun, run_ranks
from compactbed.scenarios.schema import METHOD_PRESETS, parse_scenario

LABELS = [0, 1, 2, 3, 4, 5, 6, 7]


def scenario(nodes=4, steps=8, warmup=("local", 1), **kw):
    data = dict(name="itest", nodes=nodes, steps=steps, methods=["ring"],
                warmup={"mode": warmup[0], "steps": warmup[1]}, timeout_s=60) | kw
    if "prompts" not in data:
        data.setdefault("labels", LABELS)
    return parse_scenario(data, "itest")


class Launched:
    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.run = json.loads((run_dir / "run.json").read_text())
        self.images = np.load(run_dir / "images.npy")
        self.records = [json.loads(l) for f in sorted(run_dir.glob("rank*.jsonl")) for l in f.open()]


@pytest.fixture(scope="session")
def tiny():
    return load_model()


@pytest.fixture(scope="session")
def reference(tiny):
    cache = {}

    def get(sc, seed=0):
        key = (sc.model.path, sc.model.name, sc.frames, sc.resolution, sc.steps, seed, sc.guidance,
               tuple(sc.conditions))
        if key not in cache:
            model = tiny if sc.model.path is None and sc.model.name == "tiny_flux_mnist" else \
                load_for(sc.model, frames=sc.frames)
            cache[key] = sample_reference(model, sc.conditions, sc.resolution, sc.steps, seed, sc.guidance).numpy()
        return cache[key]

    return get


@pytest.fixture
def launch_pass(tmp_path):
    """Several method runs of one scenario in one launch (ranks kept across them, as `scenario run` does);
    returns one Launched per method, in order, and the launch's folder (its launcher logs)."""
    launches = iter(range(1000))

    def go(sc, methods, seed=0, timeout_s=240, on_step=None, on_run=None):
        folder = tmp_path / f"launch{next(launches)}"
        dirs = []
        for i, method in enumerate(methods):
            method = METHOD_PRESETS[method] if isinstance(method, str) else method
            run_dir = folder / f"{i}-{method.name}-{sc.world_size}-{seed}"
            run_dir.mkdir(parents=True)
            job = Job(scenario=sc, method=method, seed=seed, out_dir=str(run_dir))
            (run_dir / "job.json").write_text(job.model_dump_json())
            dirs.append(run_dir)
        run_ranks(local_torchrun([d / "job.json" for d in dirs], sc.world_size), folder, timeout_s,
                  on_step=on_step, on_run=on_run)
        return [Launched(d) for d in dirs], folder

    return go


@pytest.fixture
def launch(launch_pass):
    """One method run in a launch of its own."""
    def go(sc, method, seed=0, timeout_s=240, on_step=None):
        (out,), _ = launch_pass(sc, [method], seed, timeout_s, on_step)
        return out

    return go
