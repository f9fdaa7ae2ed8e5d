"""Flux attention processors whose keys/values for the whole sequence come from an exchange strategy.

Used with xfuser's Flux wrapper (which splits the sequence over ranks and gathers the output):
  ``patch``         all-gather every rank's fresh K/V each layer (synchronous patch parallelism)
  ``distrifusion``  use the *previous* step's K/V of other ranks (stale), gathered asynchronously while the
                    current step computes (DistriFusion, Li et al. CVPR 2024); fresh K/V for the own patch
  ``local``         the full sequence on one rank, no communication; records K/V (local warmup)
Projections, norms and RoPE follow xfuser's own Flux processor (non-fused path) exactly.

When the text tokens do not divide by the sequence-parallel degree, xfuser's wrapper leaves them unsplit: every rank
holds all of them. Their keys and values then join each rank's attention locally and never cross the network; only
image K/V are exchanged (``text_tokens`` of these processors, and :class:`UnsplitTextAttnProcessor` in place of
xfuser's own processor, which would count the text once per rank).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .comm import CommHooks

Mode = Literal["patch", "distrifusion", "local"]


def qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Queries, keys, values [B, S, H, D] of the joint [text; image] sequence, normed and rotated."""
    q, k, v, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if attn.added_kv_proj_dim is not None:
        eq, ek, ev = (t.unflatten(-1, (attn.heads, -1)) for t in (eq, ek, ev))
        eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return q, k, v


class ExchangeAttnProcessor:
    """One layer's attention with K/V exchanged by ``mode``; ``hooks`` does the (compressed) gathers and knows
    the current layer (the engine sets it as each block starts)."""

    def __init__(self, mode: Mode, hooks: CommHooks | None = None, group=None, text_tokens: int = 0):
        self.mode, self.hooks, self.group = mode, hooks, group
        self.text_tokens = text_tokens    # unsplit text: held by every rank, never exchanged
        self.recorded: tuple[torch.Tensor, torch.Tensor] | None = None   # local mode: full-sequence K/V
        self.stale: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # distrifusion: last step's K/V
        self._pending = None
        self.fresh = True    # distrifusion: synchronous gather this step (warmup)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        q, k, v = qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # [B,H,S,D]
        t = self.text_tokens if self.mode != "local" else 0
        text_kv = (k[:, :, :t], v[:, :, :t])
        k, v = k[:, :, t:].contiguous(), v[:, :, t:].contiguous()
        if self.mode == "local":
            self.recorded = (k, v)
            keys, values = k, v
        elif self.mode == "patch" or self.fresh or (self.stale is None and self._pending is None):
            parts = self.hooks.all_gather_kv(k, v, self.group)
            if self.mode == "distrifusion":
                self.stale = parts
            keys, values = torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
        else:
            parts = self.hooks.wait(self._pending) if self._pending is not None else self.stale
            rank = dist.get_rank(self.group)
            parts = [(k, v) if i == rank else p for i, p in enumerate(parts)]
            keys, values = torch.cat([p[0] for p in parts], 2), torch.cat([p[1] for p in parts], 2)
            self.stale = None
            self._pending = self._launch(k, v)     # refresh for the next step, overlapping this step
        if t:
            keys, values = torch.cat([text_kv[0], keys], 2), torch.cat([text_kv[1], values], 2)
        out = F.scaled_dot_product_attention(q, keys, values).transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            txt = encoder_hidden_states.shape[1]
            enc, img = out[:, :txt], out[:, txt:]
            return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(enc)
        return out

    def _launch(self, k, v):
        """Start the stale-K/V gather for the next step; returns a callable that waits for it."""
        hooks = self.hooks
        payload = hooks.encode_kv(k, v)
        hooks.count_send(payload, hops=hooks.world - 1, raw_nbytes=(k.numel() + v.numel()) * k.element_size())
        gathered = [torch.empty_like(payload) for _ in range(hooks.world)]
        work = dist.all_gather(gathered, payload.contiguous(), group=self.group, async_op=True)
        rank, shapes, dtype, layer = hooks.rank, (k.shape, v.shape), k.dtype, hooks.layer

        def finish():
            work.wait()
            return [(None, None) if i == rank else hooks.decode_kv(p, i, *shapes, dtype, layer)
                    for i, p in enumerate(gathered)]

        return finish

    def drain(self) -> None:
        """Receive the refresh the last step sent ahead (for a step that never comes), so every stream's base has
        taken every payload."""
        if self._pending is not None:
            self._pending()
            self._pending = None


class UnsplitTextAttnProcessor:
    """xfuser's Flux attention with unsplit text: the image part goes through xDiT's USP (ring rotation, Ulysses
    all-to-all, both) and the ``text_tokens`` every rank holds join it as joint tensors (strategy "front")."""

    def __init__(self, text_tokens: int):
        self.text_tokens = text_tokens

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        from xfuser.model_executor.layers.usp import USP

        q, k, v = (x.transpose(1, 2) for x in qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb))
        t = self.text_tokens
        out = USP(q[:, :, t:], k[:, :, t:].contiguous(), v[:, :, t:].contiguous(), joint_query=q[:, :, :t],
                  joint_key=k[:, :, :t], joint_value=v[:, :, :t], joint_strategy="front")
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is not None:
            enc, img = out[:, :t], out[:, t:]
            return attn.to_out[1](attn.to_out[0](img)), attn.to_add_out(enc)
        return out
