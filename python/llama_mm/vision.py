"""The Mllama vision tower: tiled patch embedding, gated tile/position embeddings, a local encoder and a gated
global encoder, with chosen intermediate layers concatenated to the output (`vision_output_dim` features).

Shapes: B batch, N images per row, T tiles per image (max_num_tiles), P patches per tile + class token,
L = P padded to a multiple of 8, C vision hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import VisionConfig


class AspectRatioEmbedding(nn.Module):
    """One tanh-gated embedding per tile, chosen by the image's aspect-ratio id (pre- and post-tile)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.tiles, self.hidden = cfg.max_num_tiles, cfg.hidden_size
        self.embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [BN, T, P, C]; aspect_ratio_ids [BN]."""
        emb = self.embedding(aspect_ratio_ids).reshape(-1, self.tiles, 1, self.hidden)  # (BN, T, 1, C)
        return x + emb * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """Patch position embedding weighted by (1 - tanh(gate)), plus a per-aspect-ratio tile position embedding
    weighted by tanh(gate)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.tiles, self.patches, self.hidden = cfg.max_num_tiles, cfg.num_patches, cfg.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(cfg.num_patches, cfg.hidden_size))
        self.tile_embedding = nn.Embedding(cfg.max_aspect_ratio_id + 1,
                                           cfg.max_num_tiles * cfg.num_patches * cfg.hidden_size)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [BN, T, P, C]; aspect_ratio_ids [BN]."""
        gate = self.gate.tanh()
        x = x + ((1 - gate) * self.embedding).view(1, 1, self.patches, self.hidden)
        tile = self.tile_embedding(aspect_ratio_ids).reshape(x.shape[0], self.tiles, self.patches, self.hidden)
        return x + gate * tile


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        BN, S, C = x.shape
        q, k, v = (ops.apply_linear(p, x).view(BN, S, self.n_heads, self.head_dim).transpose(1, 2)  # (BN, H, S, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attend_with_padding(q, k, v, pad)  # (BN, H, S, D)
        return ops.apply_linear(self.o_proj, out.transpose(1, 2).reshape(BN, S, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.apply_linear(self.fc2, F.gelu(ops.apply_linear(self.fc1, x)))


class VisionLayer(nn.Module):
    """Pre-LayerNorm transformer layer; in the global encoder both branches are tanh-gated."""

    def __init__(self, cfg: VisionConfig, gated: bool):
        super().__init__()
        self.gated = gated
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), pad)
        h = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        mlp = self.mlp(self.post_attention_layernorm(h))
        return h + (self.gate_ffn.tanh() * mlp if self.gated else mlp)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, pad: torch.Tensor, keep: tuple[int, ...] = ()):
        """Returns the final states and the outputs of the layers whose indices are in `keep`."""
        kept = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, pad)
            if i in keep:
                kept[i] = x
        return x, [kept[i] for i in keep]


def padding_tokens(aspect_ratio_mask: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """aspect_ratio_mask [BN, T] -> pad [BN, T*L] bool: a token is padding when its tile is empty or it is one of
    the patches added to reach a multiple of 8."""
    BN, T = aspect_ratio_mask.shape
    pad = (aspect_ratio_mask[:, :, None] == 0).expand(BN, T, cfg.padded_patches).clone()  # (BN, T, L)
    pad[:, :, cfg.num_patches:] = True
    return pad.reshape(BN, T * cfg.padded_patches)


def attend_with_padding(q, k, v, pad) -> torch.Tensor:
    """q, k, v [BN, H, S, D]; pad [BN, S] bool -> [BN, H, S, D].

    transformers (and Meta's reference) mask only padding-to-padding pairs (its additive finfo.min mask is the outer
    product of the padding indicator): real queries see every token, padding queries see only real tokens (all
    tokens, uniformly, when the whole image is padding). So the real queries take mask-free attention and the
    padding queries attention with their keys masked, each row computed once: the same numbers without an [S, S]
    mask per image (a 1-tile image pads 3 of its 4 tiles, so most rows are padding)."""
    if not bool(pad.any()):
        return F.scaled_dot_product_attention(q, k, v)
    if bool((pad == pad[:1]).all()):  # every image pads the same tokens (e.g. one image): batched calls
        return _split_rows(q, k, v, pad[0])
    return torch.stack([_split_rows(q[b], k[b], v[b], pad[b]) for b in range(q.shape[0])])


def _split_rows(q, k, v, pad) -> torch.Tensor:
    """Attention for q [..., S, D] against k, v: rows where pad [S] is False unmasked, the others with the padding
    keys masked."""
    real, rows = (~pad).nonzero().squeeze(1), pad.nonzero().squeeze(1)
    if rows.numel() == 0:
        return F.scaled_dot_product_attention(q, k, v)
    mask = torch.zeros(1, pad.shape[0], dtype=q.dtype, device=q.device).masked_fill(pad, torch.finfo(q.dtype).min)
    out_real = F.scaled_dot_product_attention(q.index_select(-2, real), k, v)
    out_pad = F.scaled_dot_product_attention(q.index_select(-2, rows), k, v, attn_mask=mask)
    out = q.new_empty(q.shape)
    if torch.is_grad_enabled() and q.requires_grad:
        return out.index_copy(-2, real, out_real).index_copy(-2, rows, out_pad)
    return out.index_copy_(-2, real, out_real).index_copy_(-2, rows, out_pad)


class VisionModel(nn.Module):
    """`vision_model`: pixel tiles -> [B, N, T, P, vision_output_dim] features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, C, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(C))
        self.gated_positional_embedding = GatedPositionalEmbedding(cfg)
        self.pre_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.post_tile_positional_embedding = AspectRatioEmbedding(cfg)
        self.layernorm_pre = nn.LayerNorm(C)
        self.layernorm_post = nn.LayerNorm(C)
        self.transformer = VisionEncoder(cfg, cfg.num_hidden_layers, gated=False)
        self.global_transformer = VisionEncoder(cfg, cfg.num_global_layers, gated=True)

    def embed_patches(self, tiles: torch.Tensor) -> torch.Tensor:
        """tiles [BNT, 3, H, W] -> [BNT, g * g, C]: the patch convolution (kernel = stride = patch size). Where
        `linear` widens 16-bit products, as that product: every patch's 3 * p * p values (F.unfold, in the weight's
        channel-major order) times the weight [C, 3 * p * p], each output rounded once."""
        conv = self.patch_embedding
        weight = conv.weight.reshape(conv.out_channels, -1)  # (C, 3 * p * p)
        plain = (type(conv) is nn.Conv2d and conv.bias is None and conv.padding == (0, 0) and conv.dilation == (1, 1)
                 and conv.groups == 1 and not (conv._forward_hooks or conv._forward_pre_hooks))
        if plain and ops.widens(tiles, weight):
            patches = F.unfold(tiles, conv.kernel_size, stride=conv.stride)  # (BNT, 3 * p * p, g * g)
            return ops.linear(patches.transpose(1, 2), weight)
        return conv(tiles).flatten(2).transpose(1, 2)

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """pixel_values [B, N, T, 3, H, W]; aspect_ratio_ids [B, N]; aspect_ratio_mask [B, N, T]."""
        cfg = self.cfg
        B, N, T, ch, H, W = pixel_values.shape
        C, P, L = cfg.hidden_size, cfg.num_patches, cfg.padded_patches
        dtype = self.patch_embedding.weight.dtype
        ar_ids = aspect_ratio_ids.reshape(B * N)

        x = self.embed_patches(pixel_values.reshape(B * N * T, ch, H, W).to(dtype))  # (BNT, P-1, C)
        x = self.pre_tile_positional_embedding(x.reshape(B * N, T, P - 1, C), ar_ids)
        cls = self.class_embedding.expand(B * N * T, 1, C)
        x = torch.cat([cls, x.reshape(B * N * T, P - 1, C)], dim=1)  # (BNT, P, C)
        x = self.gated_positional_embedding(x.reshape(B * N, T, P, C), ar_ids)
        x = self.layernorm_pre(x)
        x = F.pad(x, (0, 0, 0, L - P))  # (BN, T, L, C)

        pad = padding_tokens(aspect_ratio_mask.reshape(B * N, T), cfg)  # (BN, T*L)
        x, kept = self.transformer(x.reshape(B * N, T * L, C), pad, cfg.intermediate_layers_indices)
        x = self.layernorm_post(x)
        x = self.post_tile_positional_embedding(x.reshape(B * N, T, L, C), ar_ids)
        x, _ = self.global_transformer(x.reshape(B * N, T * L, C), pad)

        x = x.reshape(B * N, T, L, C)[:, :, :P]  # (BN, T, P, C)
        # Intermediate features interleave per channel: [c0_l0, c0_l1, ..., c1_l0, ...], as the projector expects.
        inter = torch.stack(kept, dim=-1).reshape(B * N, T, L, -1)[:, :, :P]  # (BN, T, P, C * k)
        out = torch.cat([x, inter], dim=-1)
        return out.reshape(B, N, T, P, -1)


def quantize_vision_int8(model: nn.Module) -> nn.Module:
    """Opt-in APPROXIMATE path: every nn.Linear of `model.vision_model` and `model.multi_modal_projector` becomes a
    dynamically quantized int8 linear (weights int8 with one scale per output channel, activations quantized per
    call; fbgemm's kernels), in place. The text stack is untouched. Inference only. Its error against the exact
    path is measured by bench/bench_vision_ttft.py --int8 (printed next to its speed)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {"vision_model": per_channel_dynamic_qconfig, "multi_modal_projector": per_channel_dynamic_qconfig}
    return quantize_dynamic(model, spec, mapping={nn.Linear: DynamicInt8Linear}, inplace=True)
