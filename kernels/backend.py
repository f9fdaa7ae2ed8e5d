"""Choose the codec backend: fused Triton kernels on CUDA, fused Numba loops on CPU, PyTorch reference else.

``auto`` picks the fastest available for the device; ``torch`` forces the reference; ``numba`` / ``triton``
force a fused backend and raise :class:`BackendUnavailable` (with the reason) when it cannot run here.
Tensors a fused backend does not accept (dtype, channels not divisible by 8) use the reference.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch

from .codec import Fused, ResidualCodec
from .spec import CodecSpec

Backend = Literal["auto", "torch", "numba", "triton"]


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


def numba_status(device: torch.device) -> tuple[bool, str]:
    if device.type != "cpu":
        return False, f"Numba loops run on CPU tensors, got {device.type}"
    if importlib.util.find_spec("numba") is None:
        return False, "the numba package is not installed"
    return True, "Numba fused loops on CPU (float32)"


def select_fused(backend: Backend, device: torch.device) -> tuple[Fused | None, str]:
    """The fused kernels to use (None = PyTorch reference) and a one-line reason for the record."""
    if backend == "torch":
        return None, "torch reference (requested)"
    if backend == "auto":
        order = ["triton"] if device.type == "cuda" else ["numba"]
    else:
        order = [backend]
    reasons = []
    for name in order:
        ok, why = (triton_status if name == "triton" else numba_status)(device)
        if ok and (name != "triton" or device.type == "cuda" or backend == "triton"):
            if name == "triton":
                from .triton_codec import FUSED
            else:
                from .cpu_codec import FUSED
            return FUSED, f"{name} fused kernels ({why})"
        reasons.append(why)
    if backend != "auto":
        raise BackendUnavailable(reasons[0])
    return None, f"torch reference ({'; '.join(reasons)})"


def make_codec(spec: CodecSpec, backend: Backend = "auto", device: torch.device | str = "cpu") -> ResidualCodec:
    fused, _ = select_fused(backend, torch.device(device))
    return ResidualCodec(spec, fused)
