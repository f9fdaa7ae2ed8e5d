"""Offline image quality against a reference generation (same seed): PSNR, SSIM, classifier agreement.

LPIPS/FID/CLIP need downloaded networks; the shipped digit classifier stands in: its label accuracy on the
images and its agreement with its own predictions on the reference.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity

from .tiny_model import DigitClassifier


def psnr(images: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole batch (images in [-1, 1]); inf when identical."""
    mse = float(np.mean((images.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(data_range ** 2 / mse)


def ssim(images: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Mean structural similarity over the batch ([B, C, H, W]; channels averaged)."""
    win = min(7, (min(images.shape[-2:]) - 1) | 1)
    vals = [structural_similarity(a, b, data_range=data_range, win_size=win, channel_axis=0)
            for a, b in zip(images, reference)]
    return float(np.mean(vals))


@torch.no_grad()
def classify(classifier: DigitClassifier, images: np.ndarray) -> np.ndarray:
    return classifier(torch.from_numpy(images).float()).argmax(1).numpy()


def compare(images: np.ndarray, reference: np.ndarray, conditions: list,
            classifier: DigitClassifier | None) -> dict:
    """All quality figures of ``images`` against ``reference`` (same seed and conditions); the classifier's
    figures need a digit model (its conditions are the labels)."""
    out = dict(psnr_db=round(psnr(images, reference), 3), ssim=round(ssim(images, reference), 4),
               max_abs_diff=float(np.abs(images - reference).max()))
    if classifier is not None:
        pred, ref_pred = classify(classifier, images), classify(classifier, reference)
        out["label_accuracy"] = float(np.mean(pred == np.asarray(conditions)))
        out["agreement_with_reference"] = float(np.mean(pred == ref_pred))
    return out
