"""The residual + error-feedback codec (CompactFusion): send only the compressed change since the last step.

State is one ``base`` tensor per stream; a stream is (layer, source rank, tensor name). One
:class:`ResidualCodec` per rank holds the bases of the streams it sends (source = itself) and of every
stream it receives. With error feedback the sender's base is the *reconstruction*, exactly what receivers
compute, so both hold bit-identical bases (:meth:`ResidualCodec.digest` checks it across ranks).

Modes (``CodecSpec.residual``):
  ef     delta = x - base; payload = C(delta); recon = base + D(payload); base <- recon   (sender and receivers)
  no_ef  as ef on receivers, but the sender sets base <- x: bases diverge, error accumulates (ablation)
  naive  payload = C(x); recon = D(payload); no state (ablation)
Warmup steps (``warmup=True``) send x in full precision (its own dtype) and set every base to x.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple

import torch

from .compressors import Compressor, make_compressor
from .spec import CodecSpec


class StreamKey(NamedTuple):
    """One exchanged activation: e.g. (layer 3, produced by rank 1, "k")."""

    layer: int
    src: int
    name: str


class Fused(NamedTuple):
    """A fused backend (``cpu_codec``, ``triton_codec``): entry points and what it accepts."""

    name: str
    encode: object    # (x, base, kind) -> buf, updates base in place
    decode: object    # (buf, base, kind) -> base updated in place
    supports: object  # (base) -> bool; other tensors use the PyTorch reference


class ResidualCodec:
    """Per-rank codec state and the encode/decode operations of one compression method."""

    def __init__(self, spec: CodecSpec, fused: Fused | None = None):
        self.spec = spec
        self.compressor: Compressor = make_compressor(spec.compressor)
        self.fused = fused if spec.residual != "naive" and spec.compressor.kind in ("1bit", "2bit") else None
        self.bases: dict[StreamKey, torch.Tensor] = {}

    # --- sizes ------------------------------------------------------------------------------------------
    def wire_nbytes(self, x_shape: torch.Size | tuple[int, int], dtype: torch.dtype, warmup: bool) -> int:
        """Exact bytes one payload of an [N, C] tensor puts on the wire."""
        n, c = x_shape
        return n * c * dtype.itemsize if warmup else self.compressor.wire_nbytes(n, c)

    # --- sender -----------------------------------------------------------------------------------------
    def encode(self, key: StreamKey, x: torch.Tensor, warmup: bool = False) -> torch.Tensor:
        """Compress ``x`` [N, C] of stream ``key`` for sending; returns the uint8 wire buffer."""
        _check_2d(x)
        if warmup:
            self.bases[key] = x.detach().clone()
            return x.detach().contiguous().view(-1).view(torch.uint8).clone()
        if self.spec.residual == "naive":
            return self.compressor.compress(x)
        base = self._base(key, x)
        if self.fused is not None and self.spec.residual == "ef" and self.fused.supports(base) \
                and x.dtype == base.dtype and x.is_contiguous():
            return self.fused.encode(x, base, self.spec.compressor.kind)
        buf = self.compressor.compress(x.float() - base.float())
        if self.spec.residual == "ef":
            self._apply(base, buf)
        else:
            base.copy_(x)
        return buf

    # --- receiver ---------------------------------------------------------------------------------------
    def decode(self, key: StreamKey, buf: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype,
               warmup: bool = False) -> torch.Tensor:
        """Reconstruct stream ``key`` from a received buffer. The result is the stored base: read only."""
        n, c = shape
        if warmup:
            x = buf.view(dtype).view(n, c).clone()
            self.bases[key] = x
            return x
        if self.spec.residual == "naive":
            return self.compressor.decompress(buf, n, c).to(dtype)
        base = self.bases.get(key)
        if base is None:
            raise RuntimeError(f"stream {key}: no base; a warmup (sync or local) step must come first")
        if self.fused is not None and self.fused.supports(base):
            self.fused.decode(buf, base, self.spec.compressor.kind)
        else:
            self._apply(base, buf)
        return base

    # --- compile / JIT, local warmup, reset, consistency ------------------------------------------------
    def warm_up(self, dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        """Run encode and decode once on a small scratch stream so one-time costs (loading the Numba cache,
        Triton compilation) are paid at start-up, not inside the first timed step. Leaves no state behind."""
        x = torch.linspace(-1, 1, 8 * 64, device=device).to(dtype).view(8, 64)
        key = StreamKey(-1, -1, "warm-up")
        try:
            self.seed(key, torch.zeros_like(x))
            buf = self.encode(key, x)
            self.seed(key, torch.zeros_like(x))
            self.decode(key, buf, (8, 64), dtype)
        finally:
            self.bases.pop(key, None)

    def seed(self, key: StreamKey, x: torch.Tensor) -> None:
        """Local warmup: every rank computed ``x`` itself; set the base with no communication."""
        _check_2d(x)
        self.bases[key] = x.detach().clone()

    def reset(self) -> None:
        """Forget all bases (between generations)."""
        self.bases.clear()

    def digest(self, key: StreamKey) -> str:
        """Hash of a base's exact bytes; equal on all ranks for every stream when bases are consistent."""
        b = self.bases[key].contiguous()
        return hashlib.blake2b(b.view(-1).view(torch.uint8).numpy(force=True).tobytes(), digest_size=8).hexdigest()

    def _base(self, key: StreamKey, x: torch.Tensor) -> torch.Tensor:
        base = self.bases.get(key)
        if base is None:
            raise RuntimeError(f"stream {key}: no base; a warmup (sync or local) step must come first")
        if base.shape != x.shape:
            raise ValueError(f"stream {key}: shape {tuple(x.shape)} differs from its base {tuple(base.shape)}")
        return base

    def _apply(self, base: torch.Tensor, buf: torch.Tensor) -> None:
        """base <- base + D(buf), the same arithmetic on sender and receivers."""
        n, c = base.shape
        base.copy_(base.float() + self.compressor.decompress(buf, n, c))


def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"the codec works on [tokens, channels] tensors, got shape {tuple(x.shape)}")
