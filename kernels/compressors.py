"""Compressors: a 2-D tensor [N tokens, C channels] <-> one packed ``uint8`` wire buffer.

Every compressor's buffer is exactly what crosses the wire, scales and indices included, and its size is a
pure function of the shape (:meth:`Compressor.wire_nbytes`), so receivers can pre-allocate. Layouts put the
2-byte fields first so every field is a properly aligned view of the buffer. PyTorch reference code; the
fused GPU kernels in ``triton_codec.py`` write the same buffer layout.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from .spec import CompressorSpec

_EPS = 1e-12
WIRE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def pack_bits(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Pack a flat tensor of ``width``-bit codes (width 1, 2 or 4) little-end first into uint8."""
    per = 8 // width
    codes = bits.reshape(-1).to(torch.uint8)
    pad = (-codes.numel()) % per
    if pad:
        codes = torch.cat([codes, codes.new_zeros(pad)])
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=codes.device)
    return (codes.view(-1, per) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as uint8."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    mask = (1 << width) - 1
    return ((packed.view(-1, 1) >> shifts) & mask).view(-1)[:count]


class Compressor(ABC):
    """compress: [N, C] float -> uint8 buffer; decompress: buffer -> [N, C] float32."""

    def __init__(self, spec: CompressorSpec):
        self.spec = spec

    @abstractmethod
    def wire_nbytes(self, n: int, c: int) -> int:
        """Exact size of the buffer for an [n, c] input."""

    @abstractmethod
    def compress(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decompress(self, buf: torch.Tensor, n: int, c: int) -> torch.Tensor: ...

    def _check(self, buf: torch.Tensor, n: int, c: int) -> None:
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() != self.wire_nbytes(n, c):
            raise ValueError(f"{self.spec.label()}: expected a uint8 buffer of {self.wire_nbytes(n, c)} bytes "
                             f"for [{n}, {c}], got {tuple(buf.shape)} {buf.dtype}")


class Identity(Compressor):
    """Send the tensor as ``wire_dtype`` (fp16 by default)."""

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        self.dtype = WIRE_DTYPES[spec.wire_dtype]

    def wire_nbytes(self, n: int, c: int) -> int:
        return n * c * self.dtype.itemsize

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).contiguous().view(-1).view(torch.uint8)

    def decompress(self, buf: torch.Tensor, n: int, c: int) -> torch.Tensor:
        self._check(buf, n, c)
        return buf.view(self.dtype).view(n, c).float()


def rank1_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token mean |x| (fp16 [N]) and per-channel mean |x| over the global mean (fp16 [C]).

    Their outer product approximates E|x| at every element: scale[n, c] = row[n] * col[c].
    """
    a = x.abs().float()
    row = a.mean(1)
    col = a.mean(0)
    col = col / row.mean().clamp_min(_EPS)
    return row.to(torch.float16), col.to(torch.float16)


def scale_of(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    return row.float()[:, None] * col.float()[None, :]


class OneBit(Compressor):
    """sign(x) packed 8 per byte + rank-1 scale: NC/8 + 2N + 2C bytes."""

    def wire_nbytes(self, n: int, c: int) -> int:
        return 2 * n + 2 * c + math.ceil(n * c / 8)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape
        row, col = rank1_scale(x)
        return torch.cat([row.view(torch.uint8), col.view(torch.uint8), pack_bits(x >= 0, 1)])

    def decompress(self, buf: torch.Tensor, n: int, c: int) -> torch.Tensor:
        self._check(buf, n, c)
        row, col = buf[: 2 * n].view(torch.float16), buf[2 * n: 2 * n + 2 * c].view(torch.float16)
        sign = unpack_bits(buf[2 * n + 2 * c:], 1, n * c).view(n, c).bool()
        s = scale_of(row, col)
        return torch.where(sign, s, -s)


class TwoBit(Compressor):
    """sign + magnitude bit (|x| > s): levels +-0.5s and +-2s, 4 codes per byte: NC/4 + 2N + 2C bytes.

    0.5s and 2s are the conditional means of a Laplace variable with mean |x| = s below / above s.
    """

    def wire_nbytes(self, n: int, c: int) -> int:
        return 2 * n + 2 * c + math.ceil(n * c / 4)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        row, col = rank1_scale(x)
        big = x.abs().float() > scale_of(row, col)
        codes = (x >= 0).to(torch.uint8) | (big.to(torch.uint8) << 1)
        return torch.cat([row.view(torch.uint8), col.view(torch.uint8), pack_bits(codes, 2)])

    def decompress(self, buf: torch.Tensor, n: int, c: int) -> torch.Tensor:
        self._check(buf, n, c)
        row, col = buf[: 2 * n].view(torch.float16), buf[2 * n: 2 * n + 2 * c].view(torch.float16)
        codes = unpack_bits(buf[2 * n + 2 * c:], 2, n * c).view(n, c)
        s = scale_of(row, col)
        level = torch.where((codes & 2).bool(), 2.0 * s, 0.5 * s)
        return torch.where((codes & 1).bool(), level, -level)


def _quant4(m: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit min-max quantization along ``dim`` (per column of U / per row of V): codes, lo, step (fp16)."""
    lo = m.amin(dim, keepdim=True).to(torch.float16)
    step = ((m.amax(dim, keepdim=True) - lo.float()) / 15).clamp_min(_EPS).to(torch.float16)
    codes = ((m - lo.float()) / step.float()).round().clamp(0, 15).to(torch.uint8)
    return codes, lo, step


class LowRank(Compressor):
    """x ~= U @ V with U [N, r], V [r, C] from subspace iteration (QR); fp16 factors: 2r(N+C) bytes;
    ``int4``: 4-bit factors, per-component min/step: r(N+C)/2 + 8r bytes."""

    def __init__(self, spec: CompressorSpec):
        super().__init__(spec)
        self._omega: dict[tuple[int, int], torch.Tensor] = {}

    def rank(self, n: int, c: int) -> int:
        return min(self.spec.rank, n, c)

    def wire_nbytes(self, n: int, c: int) -> int:
        r = self.rank(n, c)
        if self.spec.int4:
            return 8 * r + math.ceil(r * (n + c) / 2)
        return 2 * r * (n + c)

    def _start(self, c: int, r: int, device: torch.device) -> torch.Tensor:
        key = (c, r)
        if key not in self._omega:  # fixed, seeded start: the same x always gives the same payload
            g = torch.Generator().manual_seed(c * 7919 + r)
            self._omega[key] = torch.randn(c, r, generator=g)
        return self._omega[key].to(device)

    def factors(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = x.shape
        r = self.rank(n, c)
        x = x.float()
        q = self._start(c, r, x.device)
        for _ in range(self.spec.power_iters):
            u, _ = torch.linalg.qr(x @ q)
            q, _ = torch.linalg.qr(x.T @ u)
        return x @ q, q.T.contiguous()  # U [N, r] carries the magnitudes, V [r, C] orthonormal rows

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.factors(x)
        if not self.spec.int4:
            return torch.cat([u.to(torch.float16).reshape(-1).view(torch.uint8),
                              v.to(torch.float16).reshape(-1).view(torch.uint8)])
        cu, lu, su = _quant4(u, 0)          # per column of U: [1, r]
        cv, lv, sv = _quant4(v, 1)          # per row of V:    [r, 1]
        head = torch.cat([lu.view(-1), su.view(-1), lv.view(-1), sv.view(-1)]).view(torch.uint8)
        return torch.cat([head, pack_bits(torch.cat([cu.reshape(-1), cv.reshape(-1)]), 4)])

    def decompress(self, buf: torch.Tensor, n: int, c: int) -> torch.Tensor:
        self._check(buf, n, c)
        r = self.rank(n, c)
        if not self.spec.int4:
            half = buf.view(torch.float16).float()
            return half[: n * r].view(n, r) @ half[n * r:].view(r, c)
        lu, su, lv, sv = buf[: 8 * r].view(torch.float16).float().view(4, r)
        codes = unpack_bits(buf[8 * r:], 4, r * (n + c)).float()
        u = codes[: n * r].view(n, r) * su + lu
        v = codes[n * r:].view(r, c) * sv[:, None] + lv[:, None]
        return u @ v


class Sparse(Compressor):
    """N:M sparsity: keep the ``keep`` largest |x| of every ``group`` consecutive values (row-major);
    fp16 values + 4-bit in-group indices: 2.5 bytes per kept value."""

    def _kept(self, n: int, c: int) -> int:
        return math.ceil(n * c / self.spec.group) * self.spec.keep

    def wire_nbytes(self, n: int, c: int) -> int:
        k = self._kept(n, c)
        return 2 * k + math.ceil(k / 2)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1).float()
        pad = (-flat.numel()) % self.spec.group
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        groups = flat.view(-1, self.spec.group)
        idx = groups.abs().topk(self.spec.keep, dim=1, sorted=False).indices.sort(1).values
        vals = groups.gather(1, idx)
        return torch.cat([vals.to(torch.float16).reshape(-1).view(torch.uint8), pack_bits(idx, 4)])

    def decompress(self, buf: torch.Tensor, n: int, c: int) -> torch.Tensor:
        self._check(buf, n, c)
        k = self._kept(n, c)
        vals = buf[: 2 * k].view(torch.float16).float().view(-1, self.spec.keep)
        idx = unpack_bits(buf[2 * k:], 4, k).long().view(-1, self.spec.keep)
        groups = torch.zeros(len(idx), self.spec.group, device=buf.device)
        groups.scatter_(1, idx, vals)
        return groups.view(-1)[: n * c].view(n, c)


_KINDS: dict[str, type[Compressor]] = {"identity": Identity, "1bit": OneBit, "2bit": TwoBit,
                                        "lowrank": LowRank, "sparse": Sparse}


def make_compressor(spec: CompressorSpec) -> Compressor:
    return _KINDS[spec.kind](spec)
