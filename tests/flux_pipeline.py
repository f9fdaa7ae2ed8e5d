"""A complete diffusers FluxPipeline folder with random weights, built offline from configs: the stand-in for a
real checkpoint such as FLUX.1 (same folder layout, same loading code, 4 blocks instead of 57)."""

from pathlib import Path

import torch

WORDS = ("a photo of cat dog astronaut riding horse on the moon red blue green small big city street night day "
         "painting portrait landscape").split()


def _tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, "[BOS]": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                   bos_token="[BOS]", model_max_length=max_len)


def build_flux_pipeline(out: Path, guidance_embeds: bool = False, seed: int = 0) -> Path:
    """Save a tiny random FluxPipeline (VAE /8, 4 latent channels, 4 heads x 32) to ``out``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    latent, t5_dim, clip_dim, hd = 4, 64, 32, 32
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=64, hidden_size=clip_dim, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, projection_dim=clip_dim,
                                        bos_token_id=3, eos_token_id=2, pad_token_id=0))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=t5_dim, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=2, decoder_start_token_id=0))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent, num_layers=2, num_single_layers=2, attention_head_dim=hd,
        num_attention_heads=4, joint_attention_dim=t5_dim, pooled_projection_dim=clip_dim,
        guidance_embeds=guidance_embeds, axes_dims_rope=(hd // 4, 3 * hd // 8, 3 * hd // 8))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=256,
                                                max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=_tokenizer(77),
                        text_encoder_2=t5, tokenizer_2=_tokenizer(512), transformer=transformer)
    pipe.save_pretrained(out)
    return out
