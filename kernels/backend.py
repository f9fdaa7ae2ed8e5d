"""Choose the codec backend: fused Triton kernels on CUDA devices, the PyTorch reference elsewhere."""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from .codec import Fused, ResidualCodec
from .spec import CodecSpec

Backend = Literal["auto", "torch", "triton"]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


def triton_status(device: torch.device) -> tuple[bool, str]:
    """(usable, reason) for the Triton kernels on ``device``."""
    if importlib.util.find_spec("triton") is None:
        return False, "the triton package is not installed (pip install 'compactbed[triton]')"
    import triton

    if device.type == "cuda":
        return True, "CUDA device"
    if triton.knobs.runtime.interpret:
        return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU"
    return False, f"Triton kernels need a CUDA device, got {device.type} (TRITON_INTERPRET=1 runs them on CPU, slowly)"


def select_fused(backend: Backend, device: torch.device) -> tuple[Fused | None, str]:
    """The fused kernels to use (None = PyTorch reference) and a one-line reason for the record."""
    if backend == "torch":
        return None, "torch reference (requested)"
    ok, why = triton_status(device)
    if backend == "triton" and not ok:
        raise BackendUnavailable(why)
    if backend == "auto" and (not ok or device.type != "cuda"):
        return None, f"torch reference ({why})" if not ok else "torch reference (CPU)"
    from .triton_codec import FUSED

    return FUSED, f"triton fused kernels ({why})"


def make_codec(spec: CodecSpec, backend: Backend = "auto", device: torch.device | str = "cpu") -> ResidualCodec:
    fused, _ = select_fused(backend, torch.device(device))
    return ResidualCodec(spec, fused)
