"""The Mllama text decoder: RMSNorm, llama3 rope, self-attention layers and gated cross-attention layers.

Module and parameter names follow the checkpoints' (`language_model.model.layers.N.self_attn.q_proj.weight`, ...)
so loading needs no renaming and LoRA targets have PEFT's names. This is the reference path (and the one training
uses); the native engine reads the same weight tensors.

Shapes: B batch, T query tokens, S key tokens, C hidden, H heads, Hkv key/value heads, D head_dim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


def attend(q, k, v, mask, groups: int) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D], additive float mask broadcastable to [B, H, T, S] -> [B, T, H*D]."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)  # (B, H, T, D)
    B, H, T, D = out.shape
    return out.transpose(1, 2).reshape(B, T, H * D)


class Projections(nn.Module):
    """q/k/v/o projections with grouped KV heads, shared by self- and cross-attention."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)


class SelfAttention(Projections):
    def forward(self, x, positions, inv_freq, mask):
        B, T, _ = x.shape
        q = ops.rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim), positions, inv_freq)  # (B, T, H, D)
        k = ops.rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), positions, inv_freq)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.n_heads // self.n_kv)
        return self.o_proj(out)


class CrossAttention(Projections):
    """Attention from text queries to projected vision states; q and k are RMS-normalised per head."""

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def project_kv(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vision [B, S, C] -> k, v [B, Hkv, S, D]. Depends only on the image: compute once per request."""
        B, S, _ = vision.shape
        k = self.k_norm(self.k_proj(vision).view(B, S, self.n_kv, self.head_dim))
        v = self.v_proj(vision).view(B, S, self.n_kv, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, kv, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))  # (B, T, H, D)
        out = attend(q.transpose(1, 2), kv[0], kv[1], mask, self.n_heads // self.n_kv)
        return self.o_proj(out)


class SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, inv_freq, mask):
        h = x + self.self_attn(self.input_layernorm(x), positions, inv_freq, mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class CrossAttentionLayer(nn.Module):
    """Replaces self-attention in its layer: tanh-gated attention to the image, then a tanh-gated MLP whose output
    is zeroed on text rows that see no image (as transformers does; the attention output is not zeroed there)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, kv, mask, row_mask):
        """row_mask [B, T, 1]: 1 where the text row attends to at least one image tile, else 0."""
        h = x + self.cross_attn_attn_gate.tanh() * self.cross_attn(self.input_layernorm(x), kv, mask)
        return h + self.cross_attn_mlp_gate.tanh() * (row_mask * self.mlp(self.post_attention_layernorm(h)))


class TextModel(nn.Module):
    """`language_model.model`: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # vocab_size + 8 rows: `<|image|>` is row vocab_size; lm_head never produces it.
        self.embed_tokens = nn.Embedding(cfg.vocab_size + 8, cfg.hidden_size)
        cross = set(cfg.cross_attention_layers)
        self.layers = nn.ModuleList(
            CrossAttentionLayer(cfg) if i in cross else SelfAttentionLayer(cfg) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", cfg.rope.inv_freq(cfg.head_dim), persistent=False)

    def forward(self, input_ids, positions, self_mask, cross_kv=None, cross_mask=None, row_mask=None):
        """input_ids [B, T]; positions [B, T]; self_mask [B, 1, T, T] additive; cross_kv: per cross layer index a
        (k, v) pair, or None for text-only (cross layers are then skipped, as transformers does);
        cross_mask [B, 1, T, S] additive; row_mask [B, T, 1]. Returns the final hidden states [B, T, C]."""
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, CrossAttentionLayer):
                if cross_kv is not None:
                    x = layer(x, cross_kv[i], cross_mask, row_mask)
            else:
                x = layer(x, positions, self.inv_freq, self_mask)
        return self.norm(x)


class LanguageModel(nn.Module):
    """`language_model`: the decoder and its lm_head."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
