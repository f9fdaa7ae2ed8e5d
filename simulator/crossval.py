"""Leave-one-scenario-out cross-validation of the whole calibration.

Each measured run (one results folder: one scenario run) is predicted by a calibration fitted on all the *other*
runs, so every case is judged by a model that never saw it: the honest figure for a change to the model or the
fitting when no fresh held-out set is at hand. The runs come from results folders or from calibration folders'
stored runs (``runs.json``), so the shipped calibration can be cross-validated on its own. Codec timings are taken
from a stored calibration (the kernel bench is not rerun per fold, which would add its own noise to the
comparison).

usage: scenario crossval RESULTS... [--workers N] [--codec-from DIR]
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path

from .calibrate import calibrate
from .costs import DATA_DIR, Calibration
from .points import read_csv
from .predict import Case, validate
from .runs import MeasuredRun, read_runs

Fit = Callable[[list[Path], set[str]], Calibration]


def fit_without(results: list[Path], exclude: set[str], codec_from: Path = DATA_DIR) -> Calibration:
    """The calibration ``scenario calibrate`` fits on ``results`` less the results folders in ``exclude`` (quietly,
    in a scratch folder), with the codec timings of the calibration in ``codec_from``."""
    rows = read_csv(Path(codec_from) / "codec.csv")
    with tempfile.TemporaryDirectory() as scratch:
        return calibrate(results, Path(scratch), log=lambda *_: None, codec_rows=rows, exclude=exclude)


def _fold(run: MeasuredRun, results: list[Path], fit: Fit) -> tuple[str, list[Case]]:
    return run.folder, validate([run], fit(results, {run.folder}))


def leave_one_out(results: list[Path], fit: Fit = fit_without, workers: int = 1) -> Iterator[tuple[str, list[Case]]]:
    """Yield (results folder, its cases predicted by ``fit`` of all the others) for every measured run under
    ``results``, as the folds finish (``workers`` processes; ``fit`` must then be picklable)."""
    results = [Path(r) for r in results]
    runs = read_runs(results)
    if len(runs) < 2:
        raise ValueError(f"leave-one-out needs at least two measured runs, found {len(runs)}")
    fold = functools.partial(_fold, results=results, fit=fit)
    if workers <= 1:
        yield from map(fold, runs)
        return
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(fold, runs)
