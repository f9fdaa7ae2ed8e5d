"""Device profiles not measured here: compute anchored to a published single-device time, published codec timings."""

from __future__ import annotations

from .costs import DeviceProfile
from .workload import FLUX_DEV

# Paper's codec timings on L20 for one FLUX K/V shard (1088 tokens x 3072, bf16 = 6.68 MB): 1-bit compress
# 0.06 ms, decompress 0.02 ms; low-rank compress 0.93 ms. 2-bit and sparse: taken as 1-bit's (not published).
_SHARD = 1088 * 3072 * 2
L20_CODEC = {"1bit/encode": (0.0, 0.06e-3 / _SHARD), "1bit/decode": (0.0, 0.02e-3 / _SHARD),
             "2bit/encode": (0.0, 0.06e-3 / _SHARD), "2bit/decode": (0.0, 0.02e-3 / _SHARD),
             "lowrank/encode": (0.0, 0.93e-3 / _SHARD), "lowrank/decode": (0.0, 0.02e-3 / _SHARD),
             "sparse/encode": (0.0, 0.06e-3 / _SHARD), "sparse/decode": (0.0, 0.02e-3 / _SHARD)}


def l20_profile(single_gpu_s: float = 28.06, steps: int = 28) -> DeviceProfile:
    """A FLOP-proportional profile that reproduces the paper's single-GPU FLUX time (L20-class GPU), with the
    paper's codec timings and an NCCL-class fixed cost per hop (50 us) instead of this host's gloo one."""
    tokens = 4096 + 512
    h = FLUX_DEV.hidden
    per_layer = single_gpu_s / steps / FLUX_DEV.layers
    linear, attention = 24 * tokens * h * h, 4 * tokens * tokens * h        # FLOPs per layer
    k = per_layer / (linear + attention)
    return DeviceProfile(a=0.0, b=24 * k, c=4 * k, step_overhead_s=0.0, cores=0, hop_overhead_s=50e-6,
                         codec=L20_CODEC)
