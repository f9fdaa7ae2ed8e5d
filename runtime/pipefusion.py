"""PipeFusion through xDiT's own Flux pipeline (``xFuserFluxPipeline``): one stage of layers per rank.

The model's transformer goes into a diffusers ``FluxPipeline`` with no VAE or text encoders (the conditioning comes
from the model adapter as prompt embeddings, the starting noise as latents, the result stays latent) and a
FlowMatch-Euler scheduler with the tiny model's unshifted sigmas; xfuser splits its blocks into stages and streams
patches through them. The first ``warmup`` steps pass the whole image stage by stage (they fill every stage's K/V
cache); later steps attend over the other patches' K/V as the stage last saw them (stale). xfuser's progress bar
marks no steps, so a step is counted from the stage's backbone calls: one per warmup step, one per patch after.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .comm import CommHooks
from .models import DiTModel, ModelFolderError, TinyDigits


def check(dit: DiTModel, guidance: float) -> None:
    """Raise :class:`ModelFolderError` unless PipeFusion can run ``dit`` here: through xDiT's Flux pipeline, which has
    no classifier-free guidance batch, on the shipped tiny model (a pipeline folder's scheduler shift is not wired
    through yet)."""
    if not isinstance(dit, TinyDigits) or dit.cfg_scale(guidance) != 1.0:
        raise ModelFolderError("PipeFusion runs through xDiT's Flux pipeline, which has no classifier-free guidance "
                               "batch, on the shipped tiny model: use guidance 1.0 and no model.path (`scenario "
                               "predict` models the rest)")


def pipeline(dit: DiTModel, stages: int, patches: int, warmup_steps: int, dtype: torch.dtype, ulysses: int = 1,
             ring: int = 1):
    """xDiT's PipeFusion pipeline around ``dit``'s transformer (xfuser's parallel groups are made here); a stage's
    ranks split its tokens by ``ulysses`` x ``ring``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from xfuser import xFuserFluxPipeline
    from xfuser.config import xFuserArgs

    args = xFuserArgs(model="tiny_flux_mnist", pipefusion_parallel_degree=stages, num_pipeline_patch=patches,
                      ulysses_degree=ulysses, ring_degree=ring,
                      warmup_steps=warmup_steps,
                      attention_backend="SDPA_FLASH" if not torch.cuda.is_available() else None)
    engine_config, _ = args.create_config()
    engine_config.runtime_config.dtype = dtype          # its receive buffers are allocated in this dtype
    base = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                        transformer=dit.transformer)
    return xFuserFluxPipeline(base, engine_config)


def sample(pipe, dit: DiTModel, conditions, resolution: int, steps: int, warmup_steps: int, patches: int,
           x: torch.Tensor, hooks: CommHooks, on_step: Callable[[int, float], None]) -> torch.Tensor | None:
    """Run the pipeline from tokens ``x``; ``on_step(k, wall_s)`` after each step with ``hooks`` holding its counts.
    Returns the final tokens on the last stage, None elsewhere."""
    height, _ = dit.xfuser_geometry(resolution)
    kw = dit.transformer_inputs(conditions, resolution, 1.0, x.dtype, x.device)
    backbone, calls, state = pipe._backbone_forward, [0], {"step": 0, "t0": time.perf_counter()}
    hooks.start_step(0, full_precision=False)

    def step_of(call: int) -> int:
        return call if call < warmup_steps else warmup_steps + (call - warmup_steps) // patches

    def counted(*args, **kwargs):
        k = step_of(calls[0])
        if k != state["step"]:
            on_step(state["step"], time.perf_counter() - state["t0"])
            state["step"], state["t0"] = k, time.perf_counter()
            hooks.start_step(k, full_precision=False)
        calls[0] += 1
        return backbone(*args, **kwargs)

    pipe._backbone_forward = counted
    try:
        with hooks.installed():
            out = pipe(prompt_embeds=kw["encoder_hidden_states"], pooled_prompt_embeds=kw["pooled_projections"],
                       height=height, width=height, num_inference_steps=steps, latents=x,
                       max_sequence_length=dit.text_tokens, output_type="latent", guidance_scale=1.0)
        on_step(state["step"], time.perf_counter() - state["t0"])
    finally:
        pipe._backbone_forward = backbone
    return None if out is None else out.images
