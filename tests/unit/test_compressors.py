"""Compressors: exact wire formats, sizes and reconstruction properties (PyTorch reference)."""

import math

import pytest
import torch

from compactbed.kernels.compressors import make_compressor, pack_bits, scale_of, unpack_bits
from compactbed.kernels.spec import CompressorSpec

ALL = [CompressorSpec(kind="identity"), CompressorSpec(kind="identity", wire_dtype="float32"),
       CompressorSpec(kind="1bit"), CompressorSpec(kind="2bit"), CompressorSpec(kind="lowrank", rank=8),
       CompressorSpec(kind="lowrank", rank=16, int4=True), CompressorSpec(kind="sparse", keep=1, group=4),
       CompressorSpec(kind="sparse", keep=2, group=8)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", [(64, 96), (37, 40), (5, 3)])
def test_buffer_is_uint8_of_the_stated_size_and_roundtrips_shape(spec, shape):
    c = make_compressor(spec)
    x = torch.randn(*shape)
    buf = c.compress(x)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == c.wire_nbytes(*shape)
    y = c.decompress(buf, *shape)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()
    with pytest.raises(ValueError, match="expected a uint8 buffer"):
        c.decompress(buf[:-1], *shape)


@pytest.mark.parametrize("spec, expect", [
    (CompressorSpec(kind="1bit"), 1088 * 3072 // 8 + 2 * 1088 + 2 * 3072),
    (CompressorSpec(kind="2bit"), 1088 * 3072 // 4 + 2 * 1088 + 2 * 3072),
    (CompressorSpec(kind="lowrank", rank=8), 2 * 8 * (1088 + 3072)),
    (CompressorSpec(kind="lowrank", rank=32, int4=True), 32 * (1088 + 3072) // 2 + 8 * 32),
    (CompressorSpec(kind="sparse", keep=1, group=4), 1088 * 3072 // 4 * 5 // 2),
])
def test_sizes_match_the_published_formulas_at_flux_shard_shape(spec, expect):
    assert make_compressor(spec).wire_nbytes(1088, 3072) == expect
    ratio = 2 * 1088 * 3072 / expect
    published = {"1bit": 15.7, "2bit": 7.9, "lowrank": 100.0}
    if spec.kind in published:
        assert ratio == pytest.approx(published[spec.kind], rel=0.01)


def test_bit_packing_is_eight_signs_per_byte_little_end_first():
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    packed = pack_bits(bits, 1)
    assert packed.tolist() == [0b10000001, 0b00000010]
    assert unpack_bits(packed, 1, 10).tolist() == bits.int().tolist()
    codes = torch.tensor([3, 0, 1, 2, 15, 7])
    for width in (2, 4):
        c = codes % (1 << width)
        assert torch.equal(unpack_bits(pack_bits(c, width), width, len(c)), c.to(torch.uint8))
    x = torch.tensor([[0.5, -2.0, 3.0, -0.1, 0.0, 1.0, -1.0, 2.0]])
    buf = make_compressor(CompressorSpec(kind="1bit")).compress(x)
    assert buf[-1].item() == 0b10110101  # x >= 0 at positions 0, 2, 4, 5, 7


def test_one_bit_keeps_signs_and_rank1_magnitudes():
    torch.manual_seed(0)
    row, col = torch.rand(32, 1) + 0.1, torch.rand(1, 48) + 0.1
    x = torch.randn(32, 48).sign() * row * col          # |x| is exactly rank 1
    c = make_compressor(CompressorSpec(kind="1bit"))
    y = c.decompress(c.compress(x), 32, 48)
    assert torch.equal(y.sign(), x.sign())
    assert rel_err(y, x) < 2e-3                           # fp16 scales only
    assert c.decompress(c.compress(torch.zeros(4, 8)), 4, 8).abs().max() == 0


def test_two_bit_beats_one_bit_and_uses_its_levels():
    torch.manual_seed(1)
    x = torch.distributions.Laplace(0.0, 1.0).sample((128, 64))
    e1 = rel_err(make_compressor(CompressorSpec(kind="1bit")).decompress(
        make_compressor(CompressorSpec(kind="1bit")).compress(x), 128, 64), x)
    c2 = make_compressor(CompressorSpec(kind="2bit"))
    y2 = c2.decompress(c2.compress(x), 128, 64)
    assert rel_err(y2, x) < 0.75 * e1
    buf = c2.compress(x)
    scale = scale_of(buf[:256].view(torch.float16), buf[256:384].view(torch.float16))
    level = y2.abs() / scale                                  # every value is 0.5 s or 2 s, by its magnitude bit
    big = x.abs() > scale
    assert torch.allclose(level[big], torch.full_like(level[big], 2.0))
    assert torch.allclose(level[~big], torch.full_like(level[~big], 0.5))
    assert 0.1 < big.float().mean() < 0.6 and torch.equal(y2.sign(), torch.where(x >= 0, 1.0, -1.0))


def test_lowrank_is_exact_on_low_rank_input_and_int4_is_bounded():
    torch.manual_seed(2)
    x = torch.randn(100, 6) @ torch.randn(6, 80)
    c = make_compressor(CompressorSpec(kind="lowrank", rank=8))
    assert rel_err(c.decompress(c.compress(x), 100, 80), x) < 2e-3
    assert torch.equal(c.compress(x), c.compress(x))      # seeded start: deterministic payload
    q = make_compressor(CompressorSpec(kind="lowrank", rank=8, int4=True))
    assert 1e-3 < rel_err(q.decompress(q.compress(x), 100, 80), x) < 0.15
    small = make_compressor(CompressorSpec(kind="lowrank", rank=64))
    assert small.wire_nbytes(5, 3) == 2 * 3 * (5 + 3)     # rank clipped to min(N, C)


def test_sparse_keeps_exactly_the_largest_per_group():
    x = torch.tensor([[0.1, -5.0, 2.0, 0.3, 4.0, -0.2, 0.0, -4.5]])
    c = make_compressor(CompressorSpec(kind="sparse", keep=1, group=4))
    assert c.decompress(c.compress(x), 1, 8).tolist() == [[0.0, -5.0, 0.0, 0.0, 0.0, 0.0, 0.0, -4.5]]
    c2 = make_compressor(CompressorSpec(kind="sparse", keep=2, group=4))
    assert c2.decompress(c2.compress(x), 1, 8).tolist() == [[0.0, -5.0, 2.0, 0.0, 4.0, 0.0, 0.0, -4.5]]
    assert c.wire_nbytes(1, 8) == 2 * 2 + math.ceil(2 / 2)


def test_identity_is_lossless_at_its_wire_dtype():
    x = torch.randn(16, 24)
    c = make_compressor(CompressorSpec(kind="identity", wire_dtype="float32"))
    assert torch.equal(c.decompress(c.compress(x), 16, 24), x)
    h = make_compressor(CompressorSpec(kind="identity"))
    assert torch.equal(h.decompress(h.compress(x), 16, 24), x.half().float())
