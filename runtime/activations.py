"""Record the keys and values every attention layer computes along a sampling trajectory (single process).

These are the tensors parallel methods exchange; the recording feeds codec tests, the temporal-redundancy
figures and the simulator's error model.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .models import DiTModel
from .sampling import euler_sample, make_velocity


def attention_modules(transformer) -> list[torch.nn.Module]:
    """The attention module of every double- then single-stream block, in execution order."""
    return [b.attn for b in transformer.transformer_blocks] + [b.attn for b in transformer.single_transformer_blocks]


@torch.no_grad()
def record_kv(model: DiTModel, conditions: Sequence, resolution: int, steps: int, seed: int = 0,
              guidance: float = 1.0) -> dict[tuple[int, str], list[torch.Tensor]]:
    """{(layer, "k"|"v"): [step0, step1, ...]} with each entry a [tokens, channels] float32 tensor
    (batch folded into tokens; keys after their RMS norm, image-stream projections)."""
    out: dict[tuple[int, str], list[torch.Tensor]] = defaultdict(list)
    hooks = []
    for i, attn in enumerate(attention_modules(model.transformer)):
        hooks.append(attn.norm_k.register_forward_hook(
            lambda m, a, y, i=i: out[(i, "k")].append(y.detach().float().reshape(-1, y.shape[-2] * y.shape[-1]))))
        hooks.append(attn.to_v.register_forward_hook(
            lambda m, a, y, i=i: out[(i, "v")].append(y.detach().float().reshape(-1, y.shape[-1]))))
    try:
        vel = make_velocity(model, model.transformer, conditions, resolution, guidance)
        euler_sample(vel, model.initial_tokens(len(conditions), resolution, seed), model.sigmas(steps, resolution))
    finally:
        for h in hooks:
            h.remove()
    return dict(out)
