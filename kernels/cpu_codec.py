"""Fused CPU loops (Numba) for the 1-bit / 2-bit residual codec with error feedback, float32 tensors.

Same contract and byte layout as ``triton_codec`` (see there); each rank is one thread, so loops are serial.
1-bit encode: pass 1 reads x and base once for |delta| sums and the packed signs (signs need no scale);
pass 2 updates the base from the bits. 2-bit encode: pass 1 sums; pass 2 codes, packs and updates.
Reconstruction is ``base + (s if bit else -s)`` with s = row * col in float32, as in the reference, so a
Numba sender and a PyTorch (or Triton) receiver hold bit-identical bases.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .codec import Fused

_EPS = 1e-12


# Only the scale sums may reassociate (the sender alone decides the scales); the reconstruction loops
# keep strict IEEE order so every backend rounds identically.
_SUMS = dict(cache=True, nogil=True, fastmath={"reassoc", "nsz", "arcp"})
_STRICT = dict(cache=True, nogil=True)
_PACK8 = np.uint64(0x0102040810204080)   # 8 bytes of 0/1 -> one byte, byte k -> bit k
_PACK4 = np.uint32(0x01041040)           # 4 bytes of 0..3 -> one byte, byte k -> bits 2k, 2k+1
_SPREAD8 = np.uint64(0x0101010101010101)  # one byte -> 8 copies
_BIT_OF_BYTE = np.uint64(0x8040201008040201)
_SPREAD4 = np.uint32(0x01010101)


@numba.njit(**_SUMS)
def _sums_signs(x, base, rows, cols, packed, tmp):
    n, c = x.shape
    t64 = tmp.view(np.uint64)
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(c):
            d = x[i, j] - base[i, j]
            a = abs(d)
            acc += a
            cols[j] += a
            tmp[j] = d >= 0
        rows[i] = acc
        for jb in range(c // 8):
            packed[i, jb] = np.uint8((t64[jb] * _PACK8) >> np.uint64(56))


@numba.njit(**_SUMS)
def _sums(x, base, rows, cols):
    n, c = x.shape
    for i in range(n):
        acc = np.float32(0.0)
        for j in range(c):
            a = abs(x[i, j] - base[i, j])
            acc += a
            cols[j] += a
        rows[i] = acc


@numba.njit(**_STRICT)
def _apply_1bit(packed, row, col, base, tmp):
    n, c = base.shape
    t64 = tmp.view(np.uint64)
    for i in range(n):
        for jb in range(c // 8):   # byte -> 8 flag bytes (byte k nonzero iff bit k set)
            t64[jb] = (np.uint64(packed[i, jb]) * _SPREAD8) & _BIT_OF_BYTE
        r = row[i]
        for j in range(c):
            s = r * col[j]
            base[i, j] = base[i, j] + (s if tmp[j] != 0 else -s)


@numba.njit(**_STRICT)
def _code_2bit(x, base, row, col, packed, tmp):
    n, c = x.shape
    t32 = tmp.view(np.uint32)
    for i in range(n):
        r = row[i]
        for j in range(c):
            b = base[i, j]
            d = x[i, j] - b
            s = r * col[j]
            big = abs(d) > s
            level = np.float32(2.0) * s if big else np.float32(0.5) * s
            tmp[j] = np.uint8(d >= 0) | (np.uint8(big) << np.uint8(1))
            base[i, j] = b + (level if d >= 0 else -level)
        for jb in range(c // 4):
            packed[i, jb] = np.uint8((t32[jb] * _PACK4) >> np.uint32(24))


@numba.njit(**_STRICT)
def _apply_2bit(packed, row, col, base, tmp):
    n, c = base.shape
    t32 = tmp.view(np.uint32)
    sign_mask = np.empty(c, np.uint8)
    big_mask = np.empty(c, np.uint8)
    for j in range(c):
        sign_mask[j] = np.uint8(1 << (2 * (j & 3)))
        big_mask[j] = np.uint8(2 << (2 * (j & 3)))
    for i in range(n):
        for jb in range(c // 4):   # byte -> the same byte 4 times; position k reads bits 2k, 2k+1
            t32[jb] = np.uint32(packed[i, jb]) * _SPREAD4
        r = row[i]
        for j in range(c):
            s = r * col[j]
            level = np.float32(2.0) * s if tmp[j] & big_mask[j] else np.float32(0.5) * s
            base[i, j] = base[i, j] + (level if tmp[j] & sign_mask[j] else -level)


def _check(x: torch.Tensor | None, base: torch.Tensor, kind: str) -> bool:
    if kind not in ("1bit", "2bit"):
        raise ValueError(f"no fused kernel for {kind!r}")
    if base.dtype != torch.float32 or (x is not None and x.dtype != torch.float32):
        raise ValueError("fused CPU kernels take float32 tensors")
    if base.shape[1] % 8:
        raise ValueError(f"fused kernels need channels divisible by 8, got {base.shape[1]}")
    if base.device.type != "cpu" or not base.is_contiguous() or (x is not None and not x.is_contiguous()):
        raise ValueError("fused CPU kernels need contiguous CPU tensors")
    return kind == "2bit"


def _scales(buf: torch.Tensor, n: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    return (buf[: 2 * n].view(torch.float16).float().numpy(),
            buf[2 * n: 2 * n + 2 * c].view(torch.float16).float().numpy())


def encode(x: torch.Tensor, base: torch.Tensor, kind: str) -> torch.Tensor:
    """Residual of ``x`` against ``base`` -> wire buffer; base <- reconstruction (in place)."""
    two = _check(x, base, kind)
    n, c = x.shape
    per = 4 if two else 8
    buf = torch.empty(2 * n + 2 * c + n * c // per, dtype=torch.uint8)
    packed = buf[2 * n + 2 * c:].numpy().reshape(n, c // per)
    xs, bs = x.numpy(), base.numpy()
    rows, cols = np.zeros(n, np.float32), np.zeros(c, np.float32)
    tmp = np.empty(c, np.uint8)
    if two:
        _sums(xs, bs, rows, cols)
    else:
        _sums_signs(xs, bs, rows, cols, packed, tmp)
    row = torch.from_numpy(rows) / c
    buf[: 2 * n].view(torch.float16).copy_(row)
    buf[2 * n: 2 * n + 2 * c].view(torch.float16).copy_(torch.from_numpy(cols) / n / row.mean().clamp_min(_EPS))
    r16, c16 = _scales(buf, n, c)
    if two:
        _code_2bit(xs, bs, r16, c16, packed, tmp)
    else:
        _apply_1bit(packed, r16, c16, bs, tmp)
    return buf


def decode(buf: torch.Tensor, base: torch.Tensor, kind: str) -> torch.Tensor:
    """base <- base + D(buf) in place; returns base."""
    two = _check(None, base, kind)
    n, c = base.shape
    r16, c16 = _scales(buf, n, c)
    packed = buf[2 * n + 2 * c:].numpy().reshape(n, c // (4 if two else 8))
    (_apply_2bit if two else _apply_1bit)(packed, r16, c16, base.numpy(), np.empty(c, np.uint8))
    return base


def supports(base: torch.Tensor) -> bool:
    return base.dtype == torch.float32 and base.device.type == "cpu" and base.shape[1] % 8 == 0 \
        and base.is_contiguous()


FUSED = Fused(name="numba", encode=encode, decode=decode, supports=supports)
