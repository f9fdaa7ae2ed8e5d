"""What one generation computes and sends: model shape x resolution x batch x method, in tokens and bytes.

A :class:`Workload` is derived from a scenario (the shipped tiny model) or built for published shapes
(FLUX.1-dev, CogVideoX) so the simulator can predict clusters and models nobody ran here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..kernels.compressors import make_compressor
from ..scenarios.schema import TINY_VIDEO as TINY_VIDEO_NAME, MethodSpec, Scenario, ScenarioError


@dataclass(frozen=True)
class ModelShape:
    """A DiT's size: attention layers, hidden width, heads, and bytes per activation element."""

    name: str
    layers: int
    hidden: int
    heads: int
    text_tokens: int
    act_bytes: int = 2            # fp16/bf16 on GPUs; 4 for the tiny model's fp32 CPU runs
    pixels_per_token: int = 16    # VAE /8 then 2x2 patches; the tiny model works on pixels: 2x2 patches
    out_channels: int = 64        # channels of an output token (packed latents)
    guidance_embeds: bool = False  # guidance-distilled (FLUX.1-dev): guidance is an input, no CFG batch
    frames_per_latent: int = 1    # video: frames per latent frame after the first (CogVideoX, HunyuanVideo: 4)
    cross_tokens: int = 0         # text tokens each block reaches by cross-attention (PixArt); 0: the text joins the
                                  # self-attention sequence as ``text_tokens`` (MMDiT: FLUX, CogVideoX, HunyuanVideo)


# Published shapes (diffusers configs): FLUX.1-dev 19 double + 38 single blocks, 24 heads x 128;
# 1024 px -> 128x128 latents -> 64x64 = 4096 image tokens, 512 T5 tokens.
FLUX_DEV = ModelShape("flux.1-dev", layers=57, hidden=3072, heads=24, text_tokens=512, guidance_embeds=True)
# CogVideoX-5B: 42 blocks, 48 heads x 64, 226 text tokens; 49 frames 480x720 -> 13 x 30 x 45 = 17550 tokens.
COGVIDEOX_5B = ModelShape("cogvideox-5b", layers=42, hidden=3072, heads=48, text_tokens=226, frames_per_latent=4)
# HunyuanVideo: 20 double + 40 single blocks (FLUX's kinds), 24 heads x 128, 256 text tokens, guidance-distilled;
# 129 frames 720x1280 -> 33 x 45 x 80 = 118800 tokens.
HUNYUAN_VIDEO = ModelShape("hunyuanvideo", layers=60, hidden=3072, heads=24, text_tokens=256, guidance_embeds=True,
                           frames_per_latent=4)
# PixArt-alpha XL-2: 28 blocks, 16 heads x 72, self-attention over the image, cross-attention to 120 T5 tokens;
# 1024 px -> 64 x 64 = 4096 tokens; an output token is 2x2 patches of 8 channels (learned sigma).
PIXART_ALPHA = ModelShape("pixart-alpha", layers=28, hidden=1152, heads=16, text_tokens=0, cross_tokens=120,
                          out_channels=32)
TINY = ModelShape("tiny_flux_mnist", layers=4, hidden=128, heads=4, text_tokens=4, act_bytes=4, pixels_per_token=2,
                  out_channels=4)
# The video DiT built from its config (runtime/video.py): 2 blocks, 4 heads x 16; no VAE, every frame a latent frame;
# an output token is a 2x2 patch of 4 channels.
TINY_VIDEO = ModelShape(TINY_VIDEO_NAME, layers=2, hidden=64, heads=4, text_tokens=4, act_bytes=4, pixels_per_token=2,
                        out_channels=16, frames_per_latent=1)
SHAPES = {s.name: s for s in (FLUX_DEV, COGVIDEOX_5B, HUNYUAN_VIDEO, PIXART_ALPHA, TINY, TINY_VIDEO)}


@dataclass(frozen=True)
class Workload:
    """One generation of ``batch`` sequences of ``image_tokens + text_tokens`` on ``world`` ranks."""

    shape: ModelShape
    image_tokens: int
    batch: int
    steps: int
    world: int
    method: MethodSpec
    warmup_steps: int
    warmup_mode: str
    ulysses_degree: int = 1
    cfg: int = 1                  # CFG parallel: groups the guidance batch is split over (simulator.cfg)
    stages: int = 1               # PipeFusion: stages, each ulysses x ring ranks (simulator.pipefusion)
    gather_each_step: bool = True  # the output gathered after every step (xDiT); else once, after the last
    images: int = 0               # images (or videos) generated: the latents, gathered once (0: batch)
    output: tuple[int, int, int] | None = None   # (frames, height, width) in pixels of each output; None: unknown
    decode: bool = True           # the VAE decodes the outputs (False: the pipeline returns its latents)

    @property
    def degrees(self) -> tuple[int, int]:
        """(ulysses, ring) degrees the method runs with in its CFG group, or in a PipeFusion stage
        (``ulysses_degree``: the scenario's, for USP and PipeFusion)."""
        sp = self.world // self.cfg // self.stages
        if self.method.pipelined:
            return self.ulysses_degree, sp // self.ulysses_degree
        return self.method.degrees(sp, (self.ulysses_degree, sp // self.ulysses_degree))

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.shape.text_tokens

    @property
    def text_split(self) -> bool:
        """Text tokens split over the sequence-parallel group like the image; otherwise every rank holds them all
        and only image K/V are exchanged (the runtime's unsplit text, xDiT's joint attention)."""
        return self.shape.text_tokens % (self.world // self.cfg) == 0

    @property
    def local_tokens(self) -> int:
        """Tokens a rank computes (its sequence shard, batch folded in)."""
        if self.text_split:
            return self.batch * self.tokens // self.world
        return self.batch // self.cfg * (self.image_tokens * self.cfg // self.world + self.shape.text_tokens)

    @property
    def exchanged_tokens(self) -> int:
        """Tokens whose K/V a rank exchanges per layer (its shard, less unsplit text)."""
        return self.local_tokens if self.text_split else self.batch * self.image_tokens // self.world

    def kv_bytes(self) -> int:
        """Uncompressed K+V of one rank's exchanged shard for one layer."""
        return 2 * self.exchanged_tokens * self.shape.hidden * self.shape.act_bytes

    def kv_wire_bytes(self, warm: bool) -> int:
        """What one rank's K+V payload puts on the wire for one layer (compressed unless warm)."""
        if warm or not self.method.compressed:
            return self.kv_bytes()
        comp = make_compressor(self.method.codec.compressor)
        return 2 * comp.wire_nbytes(self.exchanged_tokens, self.shape.hidden)

    def output_bytes(self, sequences: int | None = None) -> int:
        """The output all-gather of one step: this rank's image tokens x output channels, of ``sequences`` (the
        batch by default)."""
        return (sequences or self.batch) * self.image_tokens // self.world * self.shape.out_channels * \
            self.shape.act_bytes

    @property
    def connection_messages(self) -> int:
        """Messages one generation sends on each connection between two ranks: per step that communicates, each
        layer's exchange (a ring's P-1 hops, one direct round, Ulysses' two all-to-alls plus its ring's hops; a
        PipeFusion stage one per layer) and the output gather."""
        u, r = self.degrees
        p = self.world // self.cfg
        per_layer = (2 * (u > 1) + r - 1 if self.method.all_to_all else 1 if self.method.pipelined or
                     self.method.exchange == "direct" else p - 1)
        steps = self.steps - (self.warmup_steps if self.warmup_mode == "local" else 0)
        return max(1, steps * (self.shape.layers * per_layer + (p - 1) * self.gather_each_step))

    def gather_bytes(self, step: int) -> int:
        """What a rank sends each peer in ``step``'s output all-gather: the step's output (xDiT's every step), or
        only after the last step its shard of the latents (no guidance copy); 0 for a local warmup step, which
        has the whole output already."""
        if step < self.warmup_steps and self.warmup_mode == "local":
            return 0
        if self.gather_each_step:
            return self.output_bytes()
        return self.output_bytes(self.images) if step == self.steps - 1 else 0


def shape_of(scenario: Scenario) -> ModelShape:
    """The scenario model's shape: a known name, or read from a local folder's configs (no weights loaded)."""
    if scenario.model.path is None and scenario.model.name in SHAPES:
        return SHAPES[scenario.model.name]
    if scenario.model.path is None:
        raise ValueError(f"no shape known for model {scenario.model.name!r}; known: {', '.join(SHAPES)}")
    return folder_shape(Path(scenario.model.path), scenario.model.dtype, scenario.model.max_sequence_length)


def folder_shape(path: Path, dtype: str = "float32", max_sequence_length: int = 512) -> ModelShape:
    """Shape of a local diffusers folder: a FluxPipeline (VAE /2^(blocks-1), then 2x2 packing, T5 tokens) or a
    tiny digit model folder (pixels in 2x2 patches, 4 label tokens)."""
    config = path / "transformer" / "config.json"
    if not config.is_file():
        raise ValueError(f"{path}: no transformer/config.json to read the model's shape from")
    t = json.loads(config.read_text())
    pipeline = (path / "model_index.json").is_file()
    if pipeline:
        vae = json.loads((path / "vae" / "config.json").read_text())
        pixels, text = 2 * 2 ** (len(vae["block_out_channels"]) - 1), max_sequence_length
    else:
        pixels, text = TINY.pixels_per_token, TINY.text_tokens
    return ModelShape(path.name, layers=t["num_layers"] + t["num_single_layers"],
                      hidden=t["num_attention_heads"] * t["attention_head_dim"], heads=t["num_attention_heads"],
                      text_tokens=text, act_bytes=4 if dtype == "float32" else 2, pixels_per_token=pixels,
                      out_channels=t.get("out_channels") or t["in_channels"],
                      guidance_embeds=bool(t.get("guidance_embeds")))


def image_tokens(shape: ModelShape, resolution: int, frames: int = 1, height: int | None = None) -> int:
    """Tokens of one image (square unless ``height`` is given) or video of ``frames`` frames (the first frame, then
    one latent frame per ``frames_per_latent``)."""
    latent_frames = 1 + (frames - 1) // shape.frames_per_latent
    side = shape.pixels_per_token
    return (resolution // side) * ((height or resolution) // side) * latent_frames


def workload_of(scenario: Scenario, method: MethodSpec, shape: ModelShape | None = None) -> Workload:
    shape = shape or shape_of(scenario)
    guided = scenario.guidance != 1.0 and not shape.guidance_embeds
    if scenario.cfg_degree(method) > 1 and not guided:
        raise ScenarioError(f"method {method.name}: CFG parallel needs a classifier-free-guidance batch; {shape.name} "
                            f"is guidance-distilled and runs one pass per step")
    return Workload(shape=shape, image_tokens=image_tokens(shape, scenario.resolution, scenario.frames, scenario.height),
                    ulysses_degree=scenario.degrees(method)[0], cfg=scenario.cfg_degree(method),
                    stages=scenario.stages(method), gather_each_step=scenario.gathers_each_step(method),
                    images=scenario.images,
                    output=(scenario.frames, scenario.height or scenario.resolution, scenario.resolution),
                    batch=scenario.images * (2 if guided else 1), steps=scenario.steps,
                    world=scenario.world_size, method=method,
                    warmup_steps=scenario.warmup.steps if method.warms_up else 0, warmup_mode=scenario.warmup.mode)
