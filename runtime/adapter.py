"""The model adapter interface: what sampling needs from a model besides its transformer (runtime/models.py and
runtime/video.py implement it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..scenarios.schema import ScenarioError


class ModelFolderError(ScenarioError):
    """A model folder (or a scenario's use of it) that cannot work; the message says what is missing."""


class DiTModel(ABC):
    """A loaded diffusion transformer with everything around it that sampling needs."""

    transformer: torch.nn.Module
    classifier: torch.nn.Module | None = None
    text_tokens: int           # conditioning tokens per image
    condition_kind: str        # "labels" or "prompts": what a scenario's conditions are

    @abstractmethod
    def image_tokens(self, resolution: int) -> int:
        """Image tokens of one square image of side ``resolution`` pixels."""

    @abstractmethod
    def cfg_scale(self, guidance: float) -> float:
        """Classifier-free guidance scale for the scenario's ``guidance`` (1.0: a single forward pass)."""

    @abstractmethod
    def transformer_inputs(self, conditions: Sequence, resolution: int, guidance: float,
                           dtype: torch.dtype, device: torch.device | str = "cpu") -> dict:
        """Keyword inputs of the transformer besides latents and timestep; with CFG the batch is
        [cond; uncond]."""

    @abstractmethod
    def initial_tokens(self, count: int, resolution: int, seed: int) -> torch.Tensor:
        """Packed starting noise [count, image tokens, channels] for ``seed`` (float32, CPU)."""

    @abstractmethod
    def sigmas(self, steps: int, resolution: int) -> torch.Tensor:
        """Noise levels from 1 towards 0, ``steps + 1`` values; sigma is also the transformer's timestep."""

    @abstractmethod
    def decode(self, tokens: torch.Tensor, resolution: int) -> torch.Tensor:
        """Final tokens -> images [B, C, H, W] in [-1, 1] (float32, CPU)."""

    @abstractmethod
    def xfuser_geometry(self, resolution: int) -> tuple[int, int]:
        """(height, vae_scale_factor) that xfuser's runtime state takes for this resolution."""

    def to(self, device: torch.device | str) -> "DiTModel":
        """Move what runs per step (and what encodes and decodes) to ``device``."""
        self.transformer.to(device)
        return self

    def check_layout(self, resolution: int, world: int, ulysses: int = 1) -> None:
        """Raise :class:`ModelFolderError` unless image tokens and heads split evenly over the parallel degrees (text
        tokens that do not divide stay whole on every rank)."""
        tokens, heads = self.image_tokens(resolution), self.transformer.config.num_attention_heads
        if tokens % world:
            raise ModelFolderError(f"{tokens} image tokens must divide by the sequence-parallel degree {world}")
        if heads % ulysses:
            raise ModelFolderError(f"the model's {heads} heads must divide by the Ulysses degree {ulysses}")


def guided_labels(conditions: Sequence, guidance: float) -> torch.Tensor:
    """Digit labels of a label-conditioned model's batch: [conditions; unconditional] with guidance, else as given."""
    from .tiny_model import NULL_LABEL

    labels = torch.as_tensor(list(conditions))
    return torch.cat([labels, torch.full_like(labels, NULL_LABEL)]) if guidance != 1.0 else labels
