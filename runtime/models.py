"""Model adapters: what sampling needs from a model besides its transformer.

A run needs conditioning tokens, starting noise, a noise schedule and a decoder, and these differ by model.
Two kinds of local folder load through diffusers' own ``from_pretrained`` (never from a hub):

- :class:`TinyDigits`, the shipped tiny model: digit labels condition it and it works on pixels;
- :class:`FluxPipelineModel`, a diffusers ``FluxPipeline`` folder (FLUX.1-dev/-schnell layout, or any
  folder with a ``model_index.json`` naming ``FluxPipeline``). Prompts go through the pipeline's
  ``encode_prompt``, noise and sigmas follow its ``prepare_latents`` and FlowMatch-Euler scheduler,
  and its VAE decodes.

Every rank builds the same adapter, so conditioning is computed locally and never crosses the network.
``transformer_cls`` loads the same weights into xfuser's parallel wrapper class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .adapter import DiTModel, ModelFolderError, guided_labels
from .tiny_model import TINY_MODEL_DIR, TinyModel, image_ids, load_tiny_model, pack, text_ids, unpack


class TinyDigits(DiTModel):
    """The shipped tiny model: labels 0-9 condition it (10 = unconditional); 2x2 pixel patches."""

    condition_kind = "labels"

    def __init__(self, tiny: TinyModel):
        self.tiny = tiny
        self.transformer, self.classifier = self.tiny.transformer, self.tiny.classifier
        self.text_tokens = self.tiny.label_encoder.text_tokens

    def image_tokens(self, resolution: int) -> int:
        return (resolution // 2) ** 2

    def cfg_scale(self, guidance: float) -> float:
        return guidance

    def transformer_inputs(self, conditions, resolution, guidance, dtype, device="cpu") -> dict:
        labels = guided_labels(conditions, guidance)
        with torch.no_grad():
            enc, pooled = self.tiny.label_encoder(labels)
        return dict(encoder_hidden_states=enc.to(device, dtype), pooled_projections=pooled.to(device, dtype),
                    img_ids=image_ids(resolution).to(device, dtype), txt_ids=text_ids(enc.shape[1]).to(device, dtype),
                    return_dict=False)

    def initial_tokens(self, count, resolution, seed) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return pack(torch.randn(count, 1, resolution, resolution, generator=g))

    def sigmas(self, steps, resolution) -> torch.Tensor:
        return torch.linspace(1.0, 0.0, steps + 1)

    def decode(self, tokens, resolution) -> torch.Tensor:
        return unpack(tokens.float().cpu(), resolution).clamp(-1, 1)

    def xfuser_geometry(self, resolution) -> tuple[int, int]:
        return resolution * 8, 8


class FluxPipelineModel(DiTModel):
    """A diffusers FluxPipeline folder. ``guidance`` is the distilled guidance embedding when the transformer
    has one (FLUX.1-dev), else true classifier-free guidance against the empty prompt (1.0 = off)."""

    condition_kind = "prompts"

    def __init__(self, path: Path, dtype: torch.dtype, transformer_cls=None, max_sequence_length: int = 512):
        import transformers
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()       # every rank loads; one progress display is the runner's
        transformers.utils.logging.disable_progress_bar()
        cls = transformer_cls or FluxTransformer2DModel
        transformer = cls.from_pretrained(path / "transformer", dtype=dtype).eval()
        self.pipe = FluxPipeline.from_pretrained(path, transformer=transformer, dtype=dtype)
        for name in ("text_encoder", "text_encoder_2", "vae"):
            getattr(self.pipe, name).eval()
        self.transformer, self.text_tokens = transformer, max_sequence_length
        self.distilled = bool(transformer.config.guidance_embeds)

    @property
    def _latent_side(self) -> int:
        return 2 * self.pipe.vae_scale_factor   # VAE downsampling, then 2x2 packing

    def image_tokens(self, resolution: int) -> int:
        return (resolution // self._latent_side) ** 2

    def cfg_scale(self, guidance: float) -> float:
        return 1.0 if self.distilled else guidance

    def check_layout(self, resolution: int, world: int, ulysses: int = 1) -> None:
        if resolution % self._latent_side:
            raise ModelFolderError(f"resolution {resolution} px must be a multiple of {self._latent_side} (VAE /"
                                   f"{self.pipe.vae_scale_factor}, then 2x2 patches)")
        super().check_layout(resolution, world, ulysses)

    def to(self, device: torch.device | str) -> "FluxPipelineModel":
        self.pipe.to(device)
        return self

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.pipe.text_encoder.device,
                                           max_sequence_length=self.text_tokens)

    def transformer_inputs(self, conditions, resolution, guidance, dtype, device="cpu") -> dict:
        prompts = list(conditions)
        enc, pooled, txt = self._encode(prompts)
        if self.cfg_scale(guidance) != 1.0:
            neg, neg_pooled, _ = self._encode([""] * len(prompts))
            enc, pooled = torch.cat([enc, neg]), torch.cat([pooled, neg_pooled])
        side = resolution // self._latent_side
        kw = dict(encoder_hidden_states=enc.to(device, dtype), pooled_projections=pooled.to(device, dtype),
                  img_ids=self.pipe._prepare_latent_image_ids(1, side, side, device, dtype),
                  txt_ids=txt.to(device, dtype), return_dict=False)
        if self.distilled:
            kw["guidance"] = torch.full([len(enc)], guidance, device=device, dtype=torch.float32)
        return kw

    def initial_tokens(self, count, resolution, seed) -> torch.Tensor:
        channels = self.transformer.config.in_channels // 4
        latents, _ = self.pipe.prepare_latents(count, channels, resolution, resolution, torch.float32, "cpu",
                                               torch.Generator().manual_seed(seed))
        return latents

    def sigmas(self, steps, resolution) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        mu = calculate_shift(self.image_tokens(resolution), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        self.pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
        return self.pipe.scheduler.sigmas.float().clone()

    @torch.no_grad()
    def decode(self, tokens, resolution, chunk: int = 8) -> torch.Tensor:
        vae = self.pipe.vae
        param = next(vae.parameters())
        latents = self.pipe._unpack_latents(tokens, resolution, resolution, self.pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        parts = [vae.decode(c.to(param.device, param.dtype), return_dict=False)[0].float().cpu()
                 for c in latents.split(chunk)]
        return torch.cat(parts).clamp(-1, 1)

    def xfuser_geometry(self, resolution) -> tuple[int, int]:
        return resolution, self._latent_side


def folder_kind(path: Path) -> str:
    """``tiny`` or ``flux_pipeline``; a clear error for anything else (checked without loading weights)."""
    index = path / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name")
        if name == "FluxPipeline":
            return "flux_pipeline"
        raise ModelFolderError(f"{path}: model_index.json names {name!r}; supported pipelines: FluxPipeline")
    if (path / "transformer" / "config.json").is_file():
        if (path / "label_encoder.safetensors").is_file():
            return "tiny"
        raise ModelFolderError(f"{path}: a transformer without its pipeline; point model.path at the whole "
                               f"diffusers folder (model_index.json, text encoders, tokenizers, VAE, scheduler)")
    raise ModelFolderError(f"{path}: not a model folder (expected model_index.json of a FluxPipeline, or "
                           f"transformer/ and label_encoder.safetensors of a tiny digit model)")


def check_folder(spec, conditions: Sequence) -> str:
    """A scenario's ``model.path`` checked without loading weights: it is a model folder this project can load, and
    the scenario conditions it as it expects (labels or prompts). Returns its kind; raises ModelFolderError."""
    path = Path(spec.path)
    if not path.is_dir():
        raise ModelFolderError(f"model.path: {path}: no such folder")
    kind = folder_kind(path)
    expects = "labels" if kind == "tiny" else "prompts"
    given = "prompts" if conditions and isinstance(conditions[0], str) else "labels"
    if given != expects:
        raise ModelFolderError(f"model.path: {path} is conditioned on {expects}, but the scenario gives {given} "
                               f"(set `{expects}:`)")
    return kind


def load_model(path: Path | str | None = None, dtype: torch.dtype = torch.float32, transformer_cls=None,
               max_sequence_length: int = 512) -> DiTModel:
    """Load a local model folder (default: the shipped tiny model) behind its adapter."""
    path = Path(path) if path else TINY_MODEL_DIR
    if not path.is_dir():
        raise ModelFolderError(f"{path}: no such model folder")
    if folder_kind(path) == "tiny":
        return TinyDigits(load_tiny_model(path, dtype, transformer_cls))
    return FluxPipelineModel(path, dtype, transformer_cls, max_sequence_length)


def load_for(spec, transformer_cls=None, frames: int = 1) -> DiTModel:
    """Load a scenario's ``model:`` (a :class:`~compactbed.scenarios.schema.ModelSpec`); ``frames``: video models."""
    from .video import VIDEO_MODEL, TinyVideo

    if spec.path is None and spec.name == VIDEO_MODEL:
        return TinyVideo(frames, getattr(torch, spec.dtype), transformer_cls)
    if spec.path is None and spec.name != "tiny_flux_mnist":
        raise ModelFolderError(f"unknown shipped model {spec.name!r} (tiny_flux_mnist ships, {VIDEO_MODEL} is built "
                               f"from its config; use model.path for a local diffusers folder)")
    return load_model(spec.path, getattr(torch, spec.dtype), transformer_cls, spec.max_sequence_length)


def check_conditions(model: DiTModel, conditions: Sequence) -> None:
    """Labels go with label-conditioned models and prompts with pipelines; say which is missing."""
    given = "prompts" if conditions and isinstance(conditions[0], str) else "labels"
    if given != model.condition_kind:
        raise ModelFolderError(f"this model is conditioned on {model.condition_kind}, but the scenario gives "
                               f"{given} (set `{model.condition_kind}:`)")

