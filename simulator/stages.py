"""A generation's stages outside the denoiser, as xDiT's examples time them: the text encoders before the first step
and the VAE decode after the last. Neither is parallel in the published runs (xDiT decodes the whole latents on
every rank of the last group), so they add to every configuration's latency alike.

Workload: FLOPs and bytes of each module, built from the model's published config on PyTorch's meta device (no
weights, nothing downloaded) and counted by ``torch.utils.flop_counter`` while it runs (bytes: what its ops write,
read once again). Counting imports diffusers and transformers (seconds), so the counts ship in
``profiles/stages.yaml``; ``python -m compactbed.simulator.stages`` counts anew and rewrites it.
Device: a text encoder is GEMMs, priced at the device's fitted DiT efficiency; a VAE decoder is convolutions and
group norms, priced at the efficiency of one published decode of its kind (:data:`VAE_ANCHORS`: an image VAE's 2D
convolutions, a video VAE's causal 3D ones), or by its HBM traffic if slower.
"""

from __future__ import annotations

import sys
from functools import cache

import yaml

from .hardware import PROFILES_DIR

COUNTS_FILE = PROFILES_DIR / "stages.yaml"

# Published configs (diffusers): FLUX.1-dev vae/config.json, text_encoder (CLIP ViT-L/14) and text_encoder_2
# (T5 v1.1 XXL encoder); CogVideoX-5b vae/config.json (AutoencoderKLCogVideoX's defaults) and its T5 encoder.
FLUX_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
                mid_block_add_attention=True)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)       # HunyuanVideo's LLaVA-LLaMA-3-8B text model
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77)
SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
              up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, norm_num_groups=32)         # PixArt-alpha's vae/config.json (Stable Diffusion's VAE)
PIPELINES = {   # model -> (VAE class, its config, spatial and temporal compression, the (frames, height, width) it is
    #                   counted at), text encoders (kind, tokens)
    "flux.1-dev": (("AutoencoderKL", FLUX_VAE, 8, 1, (1, 1024, 1024)), (("t5", 512), ("clip", 77))),
    "cogvideox-5b": (("AutoencoderKLCogVideoX", {}, 8, 4, (49, 480, 720)), (("t5", 226),)),
    # HunyuanVideo: its 256-token prompt follows a 95-token template the encoder also reads (crop_start 95)
    "hunyuanvideo": (("AutoencoderKLHunyuanVideo", {}, 8, 4, (129, 720, 1280)), (("llama", 351), ("clip", 77))),
    "pixart-alpha": (("AutoencoderKL", SD_VAE, 8, 1, (1, 1024, 1024)), (("t5", 120),)),
}
VAE_ANCHORS = {     # one published decode per kind: a VAE with a temporal compression is a video VAE
    "image": dict(model="flux.1-dev", device="h200", height=1024, width=1024, frames=1, seconds=0.0899,
                  source="sgl-project/sglang PR #33818: FLUX.1 AutoencoderKL decode, 1024^2, bf16, H200, explicit "
                         "sync around the decode call: 89.9 ms"),
    "video": dict(model="hunyuanvideo", device="h200", height=480, width=848, frames=77, seconds=5.713,
                  source="sgl-project/sglang PR #36012: HunyuanVideo VAE, 848x480x77, H200, sequential tiled decode "
                         "(before the PR): 5.713 s mean"),
}


def _count(run) -> tuple[float, float]:
    """(FLOPs, bytes) of ``run()`` on the meta device: FLOPs as counted, bytes as twice what its ops write."""
    import diffusers
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Written(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Written.total += t.numel() * t.element_size()
            return out

    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()       # not its "keep in float32" advice: nothing runs for real
    try:
        with torch.device("meta"), torch.no_grad():
            with FlopCounterMode(display=False) as flops, Written():
                run(torch)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return float(flops.get_total_flops()), 2.0 * Written.total


def count_vae(model: str) -> tuple[float, float]:
    """(FLOPs, bytes) of ``model``'s VAE decoding one output at its reference size, counted now."""
    import diffusers

    cls, config, spatial, temporal, (frames, height, width) = PIPELINES[model][0]

    def run(torch):
        vae = getattr(diffusers, cls)(**config).to(torch.bfloat16)
        latent_frames = 1 + (frames - 1) // temporal
        shape = (1, vae.config.latent_channels) + ((latent_frames,) if temporal > 1 else ()) + \
            (height // spatial, width // spatial)
        vae.decode(torch.empty(shape, dtype=torch.bfloat16))

    return _count(run)


def vae_decode_cost(model: str, height: int, width: int, frames: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes) of decoding one output of ``frames`` frames at ``height`` x ``width`` pixels: the count at the
    reference size, scaled by the latent's size (convolutions; the mid-block's attention, a few percent, is taken
    as linear too)."""
    _, _, spatial, temporal, (f0, h0, w0) = PIPELINES[model][0]
    latent = lambda f, h, w: (1 + (f - 1) // temporal) * (h // spatial) * (w // spatial)    # noqa: E731
    scale = latent(frames, height, width) / latent(f0, h0, w0)
    vae = counts()[model]["vae"]
    return vae["flops"] * scale, vae["bytes"] * scale


def text_encoder_flops(model: str) -> float:
    """FLOPs of encoding one prompt with every text encoder of ``model`` (at its full token length)."""
    return counts()[model]["text_encoder_flops"]


@cache
def counts() -> dict:
    """The shipped counts (``profiles/stages.yaml``), per model."""
    return yaml.safe_load(COUNTS_FILE.read_text())


def count_text_encoders(model: str) -> float:
    """FLOPs of encoding one prompt with every text encoder of ``model``, counted now."""
    import transformers

    total = 0.0
    for kind, tokens in PIPELINES[model][1]:
        def run(torch, kind=kind, tokens=tokens):
            if kind == "t5":
                enc = transformers.T5EncoderModel(transformers.T5Config(**T5_XXL))
            elif kind == "llama":
                enc = transformers.LlamaModel(transformers.LlamaConfig(**LLAMA3_8B))
            else:
                enc = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_L))
            enc.to(torch.bfloat16)(torch.zeros(1, tokens, dtype=torch.long))
        total += _count(run)[0]
    return total


def vae_kind(model: str) -> str:
    """"video" for a VAE that compresses time too, else "image"."""
    return "video" if PIPELINES[model][0][3] > 1 else "image"


@cache
def vae_efficiency(kind: str) -> float:
    """The fraction of peak at which the anchor of ``kind`` (:data:`VAE_ANCHORS`) decoded."""
    from .hardware import shipped

    a = VAE_ANCHORS[kind]
    flops, _ = vae_decode_cost(a["model"], a["height"], a["width"], a["frames"])
    return flops / (a["seconds"] * shipped().device(a["device"]).peak_tflops * 1e12)


def outside_seconds(dev, dit_efficiency: float, model: str, height: int, width: int, frames: int = 1,
                    prompts: int = 1, outputs: int = 1) -> float:
    """Seconds of the text encoders (``prompts`` prompts; CFG encodes the negative one too) and the VAE decode
    (``outputs`` images or videos) on ``dev``; 0 for a model without a known pipeline."""
    if model not in PIPELINES:
        return 0.0
    peak = dev.peak_tflops * 1e12
    flops, nbytes = vae_decode_cost(model, height, width, frames)
    vae = max(flops / (peak * vae_efficiency(vae_kind(model))), nbytes / (dev.hbm_gbs * 1e9))
    return prompts * text_encoder_flops(model) / (peak * dit_efficiency) + outputs * vae


def main() -> int:
    """Count every pipeline's stages anew and rewrite ``profiles/stages.yaml``."""
    out = {}
    for model in PIPELINES:
        flops, nbytes = count_vae(model)
        out[model] = {"vae": {"flops": flops, "bytes": nbytes}, "text_encoder_flops": count_text_encoders(model)}
        print(f"{model}: VAE {flops / 1e12:.2f} TFLOP, {nbytes / 1e9:.1f} GB; text encoders "
              f"{out[model]['text_encoder_flops'] / 1e12:.2f} TFLOP per prompt")
    COUNTS_FILE.write_text("# Counted by `python -m compactbed.simulator.stages` (simulator/stages.py): the VAE "
                           "decoding one output at\n# its reference size (FLOPs, bytes), the text encoders one prompt "
                           "(FLOPs).\n" + yaml.safe_dump(out, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
