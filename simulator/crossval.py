"""Leave-one-scenario-out cross-validation of the whole calibration.

Each results folder (one scenario run) is predicted by a calibration fitted on all the *other* folders, so every
case is judged by a model that never saw it: the honest figure for a change to the model or the fitting when no
fresh held-out set is at hand. Codec timings are taken from a stored calibration (the kernel bench is not rerun
per fold, which would add its own noise to the comparison).

usage: scenario crossval RESULTS... [--workers N] [--codec-from DIR]
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path

from .calibration import DATA_DIR, Calibration, _read_csv, calibrate
from .predict import Case, validate


def fit_without(train: list[Path], codec_from: Path = DATA_DIR) -> Calibration:
    """The calibration ``scenario calibrate`` fits on ``train`` (quietly, in a scratch folder), with the codec
    timings of the calibration in ``codec_from``."""
    rows = _read_csv(Path(codec_from) / "codec.csv")
    with tempfile.TemporaryDirectory() as scratch:
        return calibrate(train, Path(scratch), log=lambda *_: None, codec_rows=rows)


def _fold(folder: Path, folders: list[Path], fit: Callable[[list[Path]], Calibration]) -> tuple[Path, list[Case]]:
    calib = fit([f for f in folders if f != folder])
    return folder, validate([folder], calib)


def leave_one_out(folders: list[Path], fit: Callable[[list[Path]], Calibration] = fit_without,
                  workers: int = 1) -> Iterator[tuple[Path, list[Case]]]:
    """Yield (folder, its cases predicted by ``fit`` of the other folders), as the folds finish (``workers``
    processes; ``fit`` must then be picklable)."""
    folders = [Path(f) for f in folders]
    if len(folders) < 2:
        raise ValueError("leave-one-out needs at least two results folders")
    fold = functools.partial(_fold, folders=folders, fit=fit)
    if workers <= 1:
        yield from map(fold, folders)
        return
    with get_context("fork").Pool(workers) as pool:
        yield from pool.imap_unordered(fold, folders)
