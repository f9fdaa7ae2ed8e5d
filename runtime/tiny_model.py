"""The shipped tiny Flux-style model: a diffusers ``FluxTransformer2DModel`` trained on MNIST digits.

Pixel space: a 16x16 grey image is packed into 2x2 patches (8x8 = 64 image tokens of 4 channels), the same
packing FluxPipeline applies to VAE latents. The class label plays the prompt: ``LabelEncoder`` turns it into
``TEXT_TOKENS`` conditioning tokens plus a pooled vector (label 10 = unconditional, for classifier-free
guidance). Weights live in ``assets/tiny_flux_mnist/`` in diffusers' own layout and load with
``FluxTransformer2DModel.from_pretrained``, the same call that loads a real FLUX.1 transformer folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ASSETS = Path(__file__).parent / "assets"
TINY_MODEL_DIR = ASSETS / "tiny_flux_mnist"
NULL_LABEL = 10
TEXT_TOKENS = 4
IMAGE_SIZE = 16


def transformer_config(hidden_heads: int = 4, head_dim: int = 32, double_layers: int = 2,
                       single_layers: int = 2, in_channels: int = 4, text_dim: int = 64,
                       pooled_dim: int = 32) -> dict:
    """Keyword arguments of ``FluxTransformer2DModel`` for the tiny model."""
    return dict(patch_size=1, in_channels=in_channels, num_layers=double_layers,
                num_single_layers=single_layers, attention_head_dim=head_dim,
                num_attention_heads=hidden_heads, joint_attention_dim=text_dim,
                pooled_projection_dim=pooled_dim, guidance_embeds=False,
                axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8))


class LabelEncoder(nn.Module):
    """Class label -> (text tokens [B, T, text_dim], pooled [B, pooled_dim]); the tiny model's 'prompt'."""

    def __init__(self, num_labels: int = 11, text_tokens: int = TEXT_TOKENS, text_dim: int = 64,
                 pooled_dim: int = 32):
        super().__init__()
        self.text_tokens, self.text_dim = text_tokens, text_dim
        self.tokens = nn.Embedding(num_labels, text_tokens * text_dim)
        self.pooled = nn.Embedding(num_labels, pooled_dim)
        nn.init.normal_(self.tokens.weight, std=0.5)
        nn.init.normal_(self.pooled.weight, std=0.5)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokens(labels).view(len(labels), self.text_tokens, self.text_dim)
        return tok, self.pooled(labels)


class DigitClassifier(nn.Module):
    """Small CNN on 16x16 digits; the offline stand-in for LPIPS/FID/CLIP (agreement and feature FID)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def pack(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] -> [B, H/2 * W/2, 4] tokens (FluxPipeline._pack_latents for one channel)."""
    b, c, h, w = images.shape
    x = images.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`pack` for square images of side ``size``."""
    b, n, ch = tokens.shape
    g = size // 2
    x = tokens.view(b, g, g, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, ch // 4, size, size)


def image_ids(size: int) -> torch.Tensor:
    """Flux position ids [tokens, 3] = (0, row, col) of each 2x2 patch."""
    g = size // 2
    ys, xs = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(g * g, 3).float()


def text_ids(tokens: int = TEXT_TOKENS) -> torch.Tensor:
    return torch.zeros(tokens, 3)


@dataclass
class TinyModel:
    """Everything needed to sample: transformer, label encoder, classifier, and training metadata."""

    transformer: nn.Module
    label_encoder: LabelEncoder
    classifier: DigitClassifier | None
    meta: dict


def load_tiny_model(path: Path | str = TINY_MODEL_DIR, dtype: torch.dtype = torch.float32,
                    transformer_cls=None) -> TinyModel:
    """Load the shipped (or a retrained) tiny model folder with diffusers' loading code.

    ``transformer_cls`` lets the runtime load the same weights into xfuser's wrapper class.
    """
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "transformer" / "config.json").is_file():
        raise FileNotFoundError(f"no tiny model at {path} (expected transformer/config.json); "
                                f"train one with `python -m compactbed.runtime.train_tiny --out {path}`")
    cls = transformer_cls or FluxTransformer2DModel
    transformer = cls.from_pretrained(path / "transformer", dtype=dtype).eval()
    meta = json.loads((path / "train_meta.json").read_text()) if (path / "train_meta.json").is_file() else {}
    if not (path / "label_encoder.safetensors").is_file():
        raise FileNotFoundError(f"{path}: no label_encoder.safetensors, so not a tiny digit model folder (a FLUX "
                                f"checkpoint loads as a whole pipeline folder: runtime.models.load_model)")
    enc = LabelEncoder(text_dim=transformer.config.joint_attention_dim,
                       pooled_dim=transformer.config.pooled_projection_dim)
    enc.load_state_dict(load_file(path / "label_encoder.safetensors"))
    clf = None
    if (path / "classifier.safetensors").is_file():
        clf = DigitClassifier()
        clf.load_state_dict(load_file(path / "classifier.safetensors"))
        clf.eval()
    return TinyModel(transformer, enc.to(dtype).eval(), clf, meta)
