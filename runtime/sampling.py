"""Rectified-flow Euler sampling of the tiny model, single process (the reference every method is judged by).

The distributed runtime reuses :func:`euler_sample` with its parallel transformer: the sampler only needs a
``velocity(tokens, sigma) -> tokens`` callable and a per-step hook.
"""

from __future__ import annotations

from typing import Callable

import torch

from .tiny_model import NULL_LABEL, TinyModel, image_ids, pack, text_ids, unpack

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigmas(steps: int) -> torch.Tensor:
    """Noise levels 1 -> 0 (linear), ``steps + 1`` values."""
    return torch.linspace(1.0, 0.0, steps + 1)


def initial_noise(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(labels), 1, size, size, generator=g)


def conditioning(model: TinyModel, labels: torch.Tensor, guidance: float):
    """Text tokens and pooled vectors; with guidance != 1 the batch is [cond; uncond]."""
    if guidance != 1.0:
        labels = torch.cat([labels, torch.full_like(labels, NULL_LABEL)])
    with torch.no_grad():
        return model.label_encoder(labels)


def transformer_inputs(model: TinyModel, labels: torch.Tensor, size: int, guidance: float,
                       dtype: torch.dtype, device: torch.device | str = "cpu") -> dict:
    """The transformer's keyword inputs besides latents and timestep (conditioning and position ids)."""
    enc, pooled = conditioning(model, labels, guidance)
    return dict(encoder_hidden_states=enc.to(device, dtype), pooled_projections=pooled.to(device, dtype),
                img_ids=image_ids(size).to(device, dtype), txt_ids=text_ids(enc.shape[1]).to(device, dtype),
                return_dict=False)


def guided_call(forward, tokens: torch.Tensor, sigma: torch.Tensor, guidance: float,
                dtype: torch.dtype) -> torch.Tensor:
    """``forward(x, t)`` on [cond; uncond] copies of ``tokens`` combined by classifier-free guidance."""
    x = torch.cat([tokens, tokens]) if guidance != 1.0 else tokens
    v = forward(x.to(dtype), sigma.expand(len(x)).to(x.device, dtype)).float()
    if guidance != 1.0:
        vc, vu = v.chunk(2)
        v = vu + guidance * (vc - vu)
    return v


def make_velocity(model: TinyModel, transformer, labels: torch.Tensor, size: int,
                  guidance: float) -> Velocity:
    """Velocity field of ``transformer`` (plain diffusers or xfuser-wrapped) with classifier-free guidance."""
    dtype = next(transformer.parameters()).dtype
    kw = transformer_inputs(model, labels, size, guidance, dtype)
    return lambda tokens, sigma: guided_call(lambda x, t: transformer(x, timestep=t, **kw)[0], tokens, sigma,
                                             guidance, dtype)


@torch.no_grad()
def euler_sample(velocity: Velocity, noise: torch.Tensor, steps: int,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate the flow from noise (sigma=1) to an image (sigma=0); returns images in [-1, 1]."""
    size = noise.shape[-1]
    x = pack(noise)
    sig = sigmas(steps)
    for k in range(steps):
        if on_step is not None:
            on_step(k)
        x = x + (sig[k + 1] - sig[k]) * velocity(x, sig[k])
    return unpack(x, size).clamp(-1, 1)


def sample_reference(model: TinyModel, labels: torch.Tensor, steps: int, seed: int,
                     guidance: float = 1.5) -> torch.Tensor:
    """Single-process diffusers sampling: the ground truth for parallel methods."""
    size = model.meta.get("size", 16)
    vel = make_velocity(model, model.transformer, labels, size, guidance)
    return euler_sample(vel, initial_noise(labels, size, seed), steps)
