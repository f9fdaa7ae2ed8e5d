"""Rectified-flow Euler sampling, single process: the reference every method is judged by.

The distributed runtime reuses :func:`euler_sample` with its parallel transformer: the sampler only needs a
``velocity(tokens, sigma) -> tokens`` callable, the model's sigmas and a per-step hook. What differs between
models (conditioning, noise, schedule, decoding) comes from the :class:`~.models.DiTModel` adapter.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .models import DiTModel

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_call(forward, tokens: torch.Tensor, sigma: torch.Tensor, cfg_scale: float,
                dtype: torch.dtype) -> torch.Tensor:
    """``forward(x, t)`` on [cond; uncond] copies of ``tokens`` combined by classifier-free guidance
    (a single pass when ``cfg_scale`` is 1)."""
    x = torch.cat([tokens, tokens]) if cfg_scale != 1.0 else tokens
    v = forward(x.to(dtype), sigma.expand(len(x)).to(x.device, dtype)).float()
    if cfg_scale != 1.0:
        vc, vu = v.chunk(2)
        v = vu + cfg_scale * (vc - vu)
    return v


def make_velocity(model: DiTModel, transformer, conditions: Sequence, resolution: int,
                  guidance: float) -> Velocity:
    """Velocity field of ``transformer`` (plain diffusers or xfuser-wrapped) with the model's guidance."""
    dtype = next(transformer.parameters()).dtype
    device = next(transformer.parameters()).device
    kw = model.transformer_inputs(conditions, resolution, guidance, dtype, device)
    scale = model.cfg_scale(guidance)
    return lambda tokens, sigma: guided_call(lambda x, t: transformer(x, timestep=t, **kw)[0], tokens, sigma,
                                             scale, dtype)


@torch.no_grad()
def euler_sample(velocity: Velocity, tokens: torch.Tensor, sigmas: torch.Tensor,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate the flow along ``sigmas`` (from 1 towards 0) starting at ``tokens``; returns the final tokens."""
    x = tokens.float()
    for k in range(len(sigmas) - 1):
        if on_step is not None:
            on_step(k)
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity(x, sigmas[k])
    return x


def sample_reference(model: DiTModel, conditions: Sequence, resolution: int, steps: int, seed: int,
                     guidance: float = 1.5) -> torch.Tensor:
    """Single-process diffusers sampling, decoded to images in [-1, 1]: the ground truth for parallel methods."""
    device = next(model.transformer.parameters()).device
    vel = make_velocity(model, model.transformer, conditions, resolution, guidance)
    x = model.initial_tokens(len(conditions), resolution, seed).to(device)
    return model.decode(euler_sample(vel, x, model.sigmas(steps, resolution)), resolution)
