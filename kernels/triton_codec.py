"""Fused Triton kernels for the 1-bit / 2-bit residual codec with error feedback.

encode (sender), two kernels over [N, C] tiles:
  1. ``_abs_sums``: delta = x - base, per-token and per-channel sums of |delta| (the rank-1 scale)
  2. ``_quant_pack_update``: delta again, sign (+ magnitude) bits packed 8 (4) per byte into the wire
     buffer, and base <- base + D(payload) in place (error feedback), in one pass
decode (receiver): ``_unpack_update``: base <- base + D(payload) in place.

Buffers have the exact layout of ``compressors.OneBit`` / ``TwoBit`` ([row fp16 | col fp16 | packed codes]),
so either side may use the PyTorch reference. The reconstruction uses ``where(sign, s, -s)`` with
s = row * col in fp32 and exact power-of-two levels, so sender and receivers round identically.
Requires C % 8 == 0. On CPU the kernels run only under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .codec import Fused

_EPS = 1e-12
BLOCK_N, BLOCK_C = 16, 128


@triton.jit
def _abs_sums(x_ptr, base_ptr, row_ptr, col_ptr, N, C, BN: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - \
        tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.abs(d)
    tl.atomic_add(row_ptr + rows, tl.sum(a, axis=1), mask=rows < N)
    tl.atomic_add(col_ptr + cols, tl.sum(a, axis=0), mask=cols < C)


@triton.jit
def _quant_pack_update(x_ptr, base_ptr, row_ptr, col_ptr, out_ptr, N, C,
                       TWO_BIT: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    PER: tl.constexpr = 4 if TWO_BIT else 8          # codes per byte
    WIDTH: tl.constexpr = 2 if TWO_BIT else 1
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - base
    s = tl.load(row_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None] * \
        tl.load(col_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    pos = d >= 0
    code = pos.to(tl.uint8)
    level = s
    if TWO_BIT:
        big = tl.abs(d) > s
        code = code | (big.to(tl.uint8) << 1)
        level = tl.where(big, 2.0 * s, 0.5 * s)
    recon = base + tl.where(pos, level, -level)
    tl.store(base_ptr + offs, recon.to(base_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    shift = (tl.arange(0, BC) % PER).to(tl.uint8) * WIDTH
    packed = tl.sum(tl.reshape(code << shift[None, :], (BN, BC // PER, PER)), axis=2).to(tl.uint8)
    pcols = tl.program_id(1) * (BC // PER) + tl.arange(0, BC // PER)
    pmask = (rows[:, None] < N) & (pcols[None, :] < C // PER)
    tl.store(out_ptr + rows[:, None] * (C // PER) + pcols[None, :], packed, mask=pmask)


@triton.jit
def _unpack_update(buf_ptr, base_ptr, row_ptr, col_ptr, N, C,
                   TWO_BIT: tl.constexpr, BN: tl.constexpr, BC: tl.constexpr):
    PER: tl.constexpr = 4 if TWO_BIT else 8
    WIDTH: tl.constexpr = 2 if TWO_BIT else 1
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    byte = tl.load(buf_ptr + rows[:, None] * (C // PER) + cols[None, :] // PER, mask=mask, other=0)
    code = (byte >> ((cols[None, :] % PER).to(tl.uint8) * WIDTH)) & ((1 << WIDTH) - 1)
    s = tl.load(row_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None] * \
        tl.load(col_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    level = s
    if TWO_BIT:
        level = tl.where((code & 2) != 0, 2.0 * s, 0.5 * s)
    base = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    recon = base + tl.where((code & 1) != 0, level, -level)
    tl.store(base_ptr + offs, recon.to(base_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def _grid(n: int, c: int):
    return (triton.cdiv(n, BLOCK_N), triton.cdiv(c, BLOCK_C))


def _check(x: torch.Tensor, base: torch.Tensor, kind: str) -> bool:
    if kind not in ("1bit", "2bit"):
        raise ValueError(f"no fused kernel for {kind!r}")
    n, c = base.shape
    if c % 8:
        raise ValueError(f"fused kernels need channels divisible by 8, got {c}")
    if not base.is_contiguous() or (x is not None and not x.is_contiguous()):
        raise ValueError("fused kernels need contiguous tensors")
    return kind == "2bit"


def encode(x: torch.Tensor, base: torch.Tensor, kind: str) -> torch.Tensor:
    """Residual of ``x`` against ``base`` -> wire buffer; base <- reconstruction (in place)."""
    two = _check(x, base, kind)
    n, c = x.shape
    sums = torch.zeros(n + c, dtype=torch.float32, device=x.device)
    _abs_sums[_grid(n, c)](x, base, sums[:n], sums[n:], n, c, BN=BLOCK_N, BC=BLOCK_C)
    row = sums[:n] / c
    col = sums[n:] / n / row.mean().clamp_min(_EPS)
    buf = torch.empty(2 * n + 2 * c + n * c // (4 if two else 8), dtype=torch.uint8, device=x.device)
    buf[: 2 * n].view(torch.float16).copy_(row)
    buf[2 * n: 2 * n + 2 * c].view(torch.float16).copy_(col)
    _quant_pack_update[_grid(n, c)](x, base, buf[: 2 * n].view(torch.float16),
                                    buf[2 * n: 2 * n + 2 * c].view(torch.float16), buf[2 * n + 2 * c:],
                                    n, c, TWO_BIT=two, BN=BLOCK_N, BC=BLOCK_C)
    return buf


def decode(buf: torch.Tensor, base: torch.Tensor, kind: str) -> torch.Tensor:
    """base <- base + D(buf) in place; returns base."""
    two = _check(None, base, kind)
    n, c = base.shape
    _unpack_update[_grid(n, c)](buf[2 * n + 2 * c:], base, buf[: 2 * n].view(torch.float16),
                                buf[2 * n: 2 * n + 2 * c].view(torch.float16), n, c,
                                TWO_BIT=two, BN=BLOCK_N, BC=BLOCK_C)
    return base


def supports(base: torch.Tensor) -> bool:
    return base.shape[1] % 8 == 0 and base.is_contiguous()


FUSED = Fused(name="triton", encode=encode, decode=decode, supports=supports)
