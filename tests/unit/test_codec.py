"""The residual codec: bit-identical bases with error feedback, the no-EF and naive ablations, warmup."""

import pytest
import torch

from compactbed.kernels.codec import ResidualCodec, StreamKey
from compactbed.kernels.spec import CodecSpec, CompressorSpec

KINDS = [CompressorSpec(kind="1bit"), CompressorSpec(kind="2bit"), CompressorSpec(kind="lowrank", rank=4),
         CompressorSpec(kind="lowrank", rank=8, int4=True), CompressorSpec(kind="sparse"),
         CompressorSpec(kind="identity")]
K = StreamKey(layer=2, src=1, name="k")


def trajectory(steps=12, n=48, c=64, drift=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g)
    out = [x]
    for _ in range(steps - 1):
        x = x + drift * torch.randn(n, c, generator=g)
        out.append(x)
    return out


@pytest.mark.parametrize("comp", KINDS, ids=lambda s: s.label())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sender_and_receivers_hold_bit_identical_bases(comp, dtype):
    spec = CodecSpec(compressor=comp, residual="ef")
    sender, receivers = ResidualCodec(spec), [ResidualCodec(spec) for _ in range(3)]
    xs = [x.to(dtype) for x in trajectory()]
    buf = sender.encode(K, xs[0], warmup=True)
    assert buf.numel() == sender.wire_nbytes(xs[0].shape, dtype, warmup=True) == xs[0].numel() * dtype.itemsize
    for r in receivers:
        r.decode(K, buf, xs[0].shape, dtype, warmup=True)
    for x in xs[1:]:
        buf = sender.encode(K, x)
        assert buf.numel() == sender.wire_nbytes(x.shape, dtype, warmup=False)
        recons = [r.decode(K, buf, x.shape, dtype) for r in receivers]
        digests = {sender.digest(K)} | {r.digest(K) for r in receivers}
        assert len(digests) == 1
        assert all(torch.equal(rc, sender.bases[K]) for rc in recons)


def test_error_feedback_bounds_error_and_no_ef_accumulates():
    xs = trajectory(steps=40, drift=0.05)
    errs = {}
    for mode in ("ef", "no_ef", "naive"):
        spec = CodecSpec(compressor=CompressorSpec(kind="1bit"), residual=mode)
        s, r = ResidualCodec(spec), ResidualCodec(spec)
        r.decode(K, s.encode(K, xs[0], warmup=True), xs[0].shape, torch.float32, warmup=True)
        e = []
        for x in xs[1:]:
            y = r.decode(K, s.encode(K, x), x.shape, torch.float32)
            e.append(((y - x).norm() / x.norm()).item())
        errs[mode] = torch.tensor(e)
    ef, noef, naive = errs["ef"], errs["no_ef"], errs["naive"]
    assert ef.max() < 0.1                                   # bounded: residual + carried error stays small
    assert ef[-10:].mean() < 1.5 * ef[:10].mean()           # no growth
    assert noef[-10:].mean() > 2 * noef[:10].mean()         # random-walk growth without error feedback
    assert noef[-1] > 3 * ef[-1]
    assert naive.mean() > 5 * ef.mean()                     # compressing x itself is far worse
    assert not ResidualCodec(CodecSpec(compressor=CompressorSpec(kind="1bit"), residual="naive")).bases


def test_no_ef_bases_diverge_from_receiver():
    xs = trajectory(steps=3)
    spec = CodecSpec(compressor=CompressorSpec(kind="2bit"), residual="no_ef")
    s, r = ResidualCodec(spec), ResidualCodec(spec)
    r.decode(K, s.encode(K, xs[0], warmup=True), xs[0].shape, torch.float32, warmup=True)
    r.decode(K, s.encode(K, xs[1]), xs[1].shape, torch.float32)
    assert torch.equal(s.bases[K], xs[1]) and s.digest(K) != r.digest(K)


def test_local_warmup_seed_then_compressed_exchange():
    xs = trajectory(steps=4)
    spec = CodecSpec(compressor=CompressorSpec(kind="1bit"))
    s, r = ResidualCodec(spec), ResidualCodec(spec)
    s.seed(K, xs[0])
    r.seed(K, xs[0])
    for x in xs[1:]:
        r.decode(K, s.encode(K, x), x.shape, torch.float32)
    assert s.digest(K) == r.digest(K)


def test_missing_base_reset_and_bad_shapes_are_errors():
    spec = CodecSpec(compressor=CompressorSpec(kind="1bit"))
    c = ResidualCodec(spec)
    with pytest.raises(RuntimeError, match="warmup"):
        c.encode(K, torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="warmup"):
        c.decode(K, torch.zeros(c.wire_nbytes((4, 8), torch.float32, False), dtype=torch.uint8), (4, 8),
                 torch.float32)
    c.seed(K, torch.randn(4, 8))
    with pytest.raises(ValueError, match="differs from its base"):
        c.encode(K, torch.randn(5, 8))
    with pytest.raises(ValueError, match="tokens, channels"):
        c.encode(K, torch.randn(2, 4, 8))
    c.reset()
    assert not c.bases


@pytest.mark.parametrize("comp", KINDS, ids=lambda s: s.label())
def test_warm_up_leaves_no_state_and_changes_no_payload(comp):
    from compactbed.kernels.backend import make_codec

    spec = CodecSpec(compressor=comp)
    warmed, cold = make_codec(spec, "auto"), make_codec(spec, "auto")
    warmed.seed(K, trajectory()[0])
    warmed.warm_up(torch.float32)
    assert list(warmed.bases) == [K]
    cold.seed(K, trajectory()[0])
    for x in trajectory(steps=3)[1:]:
        assert torch.equal(warmed.encode(K, x), cold.encode(K, x))
    assert warmed.digest(K) == cold.digest(K)
