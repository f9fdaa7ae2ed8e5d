"""A CogVideoX-style video DiT for exactness, bytes and speed work: diffusers' ``CogVideoXTransformer3DModel`` with a
tiny config and seeded random weights, built offline (nothing downloaded, nothing trained: it makes no real video).

Digit labels condition it through a seeded embedding table (label 10: unconditional, for guidance). There is no VAE:
the latent video ``[B, F, C, H, W]`` is the sample, ``resolution`` its side and every frame is a latent frame.
:func:`sp_forward` runs it sequence-parallel with xDiT's CogVideoX attention processor (USP: ring, Ulysses, both;
unsplit text as joint tensors): every rank embeds the whole video, keeps its shard of the tokens (and of the CFG
batch), and the blocks' outputs are gathered once at the end, as xfuser's Flux wrapper does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..scenarios.schema import TINY_VIDEO
from .adapter import DiTModel, guided_labels
from .tiny_model import NULL_LABEL

VIDEO_MODEL = TINY_VIDEO
TEXT_TOKENS = 4
CONFIG = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=64,
              text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=4, patch_size=2,
              temporal_compression_ratio=1, max_text_seq_length=TEXT_TOKENS)


class TinyVideo(DiTModel):
    """The tiny video DiT behind the model adapter interface; ``frames`` latent frames per video."""

    condition_kind = "labels"
    text_tokens = TEXT_TOKENS

    def __init__(self, frames: int = 4, dtype: torch.dtype = torch.float32, transformer_cls=None, seed: int = 0):
        from diffusers import CogVideoXTransformer3DModel

        torch.manual_seed(seed)
        self.transformer = (transformer_cls or CogVideoXTransformer3DModel)(**CONFIG).to(dtype).eval()
        self.labels = nn.Embedding(NULL_LABEL + 1, TEXT_TOKENS * CONFIG["text_embed_dim"]).to(dtype)
        self.frames = frames

    def image_tokens(self, resolution: int) -> int:
        return self.frames * (resolution // CONFIG["patch_size"]) ** 2

    def cfg_scale(self, guidance: float) -> float:
        return guidance

    def transformer_inputs(self, conditions, resolution, guidance, dtype, device="cpu") -> dict:
        labels = guided_labels(conditions, guidance)
        with torch.no_grad():
            text = self.labels(labels).view(len(labels), TEXT_TOKENS, CONFIG["text_embed_dim"])
        return dict(encoder_hidden_states=text.to(device, dtype), return_dict=False)

    def initial_tokens(self, count, resolution, seed) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(count, self.frames, CONFIG["in_channels"], resolution, resolution, generator=g)

    def sigmas(self, steps, resolution) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, steps + 1)

    def decode(self, tokens, resolution) -> torch.Tensor:
        """The latent video as frames stacked in channels, [B, F*C, H, W] (no VAE: the values are latents)."""
        return tokens.float().flatten(1, 2).cpu()

    def xfuser_geometry(self, resolution) -> tuple[int, int]:
        return resolution * 8, 8


def sp_forward(model, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
               return_dict: bool = False) -> tuple[torch.Tensor]:
    """One sequence-parallel (and CFG-parallel) forward of ``model`` on this rank; every rank returns the whole
    output. Mirrors diffusers' forward for the CogVideoX-2B layout (no rotary embedding)."""
    from xfuser.core.distributed import (get_cfg_group, get_classifier_free_guidance_rank,
                                         get_classifier_free_guidance_world_size, get_runtime_state, get_sp_group)

    cfg, sp = get_classifier_free_guidance_world_size(), get_sp_group()
    half = get_classifier_free_guidance_rank()
    hidden_states, encoder_hidden_states, timestep = (t.chunk(cfg)[half] for t in
                                                      (hidden_states, encoder_hidden_states, timestep))
    b, f, _, h, w = hidden_states.shape
    emb = model.time_embedding(model.time_proj(timestep).to(hidden_states.dtype))
    seq = model.patch_embed(encoder_hidden_states, hidden_states)
    t = encoder_hidden_states.shape[1]
    text, image = seq[:, :t], seq[:, t:]
    split_text = t % sp.world_size == 0
    get_runtime_state().split_text_embed_in_sp = split_text
    image = image.chunk(sp.world_size, 1)[sp.rank_in_group]
    if split_text:
        text = text.chunk(sp.world_size, 1)[sp.rank_in_group]
    for block in model.transformer_blocks:
        image, text = block(hidden_states=image, encoder_hidden_states=text, temb=emb, image_rotary_emb=None)
    image = model.proj_out(model.norm_out(model.norm_final(image), temb=emb))
    image = get_sp_group().all_gather(image.contiguous(), dim=1)
    image = get_cfg_group().all_gather(image, dim=0)
    p = model.config.patch_size
    out = image.reshape(image.shape[0], f, h // p, w // p, -1, p, p)
    return (out.permute(0, 1, 4, 2, 5, 3, 6).flatten(5, 6).flatten(3, 4),)
