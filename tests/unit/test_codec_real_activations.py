"""The paper's ablation ordering on the shipped trained model's real K/V over a sampling trajectory:
residual + error feedback stays bounded, without error feedback the error grows, naive is worst."""

import pytest
import torch

from compactbed.kernels.codec import ResidualCodec, StreamKey
from compactbed.kernels.spec import CodecSpec, CompressorSpec
from compactbed.runtime.activations import record_kv
from compactbed.runtime.models import load_model

STEPS = 28


@pytest.fixture(scope="module")
def trajectory():
    torch.manual_seed(0)
    return record_kv(load_model(), list(range(10)), 16, steps=STEPS, seed=0)


def replay(seq, spec):
    """Sender -> receiver over the recorded steps (step 0 = full-precision warmup); relative error per step."""
    s, r = ResidualCodec(spec), ResidualCodec(spec)
    key = StreamKey(0, 0, "x")
    r.decode(key, s.encode(key, seq[0], warmup=True), seq[0].shape, torch.float32, warmup=True)
    errs = []
    for x in seq[1:]:
        y = r.decode(key, s.encode(key, x), x.shape, torch.float32)
        errs.append(((y - x).norm() / x.norm()).item())
    return torch.tensor(errs)


def test_trained_model_is_temporally_redundant(trajectory):
    cos = []
    for seq in trajectory.values():
        for a, b in zip(seq[:-1], seq[1:]):
            cos.append(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item())
    cos = torch.tensor(cos)
    assert len(trajectory) == 8 and all(len(v) == STEPS for v in trajectory.values())  # 4 layers x (k, v)
    assert cos.mean() > 0.95 and cos.min() > 0.5


@pytest.mark.parametrize("kind", ["1bit", "2bit"])
def test_ef_bounded_noef_grows_naive_worst(trajectory, kind):
    worse_noef = worse_naive = 0
    for (layer, name), seq in trajectory.items():
        e = {mode: replay(seq, CodecSpec(compressor=CompressorSpec(kind=kind), residual=mode))
             for mode in ("ef", "no_ef", "naive")}
        third = len(e["ef"]) // 3
        assert e["ef"].max() < 0.5, (layer, name, e["ef"])                       # bounded
        assert e["ef"][-third:].mean() < 2.0 * e["ef"][:third].mean() + 0.02      # no accumulation
        worse_noef += e["no_ef"][-third:].mean() > e["ef"][-third:].mean()
        worse_naive += e["naive"].mean() > e["ef"].mean()
        assert e["naive"].mean() > e["ef"].mean(), (layer, name)
    n = len(trajectory)
    assert worse_noef == n and worse_naive == n


def test_ef_error_stays_flat_while_noef_drifts_upward(trajectory):
    ef = torch.stack([replay(s, CodecSpec(compressor=CompressorSpec(kind="1bit"))) for s in trajectory.values()])
    noef = torch.stack([replay(s, CodecSpec(compressor=CompressorSpec(kind="1bit"), residual="no_ef"))
                        for s in trajectory.values()])
    ef_m, noef_m = ef.mean(0), noef.mean(0)       # mean over layers/tensors, per step
    third = len(ef_m) // 3
    # measured at 28 steps: 1-bit EF 0.067 -> 0.097, no-EF 0.160 -> 0.316 (first -> last third)
    assert noef_m[-third:].mean() > 1.5 * noef_m[:third].mean()              # no-EF error accumulates
    gap_first = noef_m[:third].mean() / ef_m[:third].mean()
    gap_last = noef_m[-third:].mean() / ef_m[-third:].mean()
    assert gap_last > gap_first > 1.5, (gap_first, gap_last)                  # and pulls away from EF
    assert noef_m[-1] > 2 * ef_m[-1]
