"""Typed wrappers over the native ops `torch.ops.llama_mm.*`, with their pure-PyTorch references.

The references are the exact Hugging Face Mllama formulas (transformers' modeling_mllama.py). Loading
`llama_mm._C` registers the native ops; without it (`NATIVE` is False) every wrapper runs its reference. A wrapper
also runs the reference when autograd needs it (grad enabled and an input requires grad), so training works, and
for devices the native module has no kernels for. The native ops themselves are differentiable too: their backward
is the reference's gradient, recomputed (so a graph that calls torch.ops.llama_mm.* directly is never silently wrong).
"""

from __future__ import annotations

import warnings

import torch

from llama_mm.quant.packing import unpack

try:
    from llama_mm import _C  # loading it registers torch.ops.llama_mm.*
except ModuleNotFoundError as e:  # not built: pure-PyTorch fallback
    _C = None
    NATIVE_ERROR: str | None = str(e)
except ImportError as e:  # built but unloadable (e.g. compiled against another torch): say so, then fall back
    _C = None
    NATIVE_ERROR = str(e)
    warnings.warn(f"llama_mm._C failed to load, using the pure-PyTorch ops: {e}", RuntimeWarning, stacklevel=2)
else:
    NATIVE_ERROR = None

NATIVE: bool = _C is not None
CUDA_KERNELS: bool = NATIVE and bool(_C.cuda_kernels)

__all__ = ["NATIVE", "CUDA_KERNELS", "rms_norm", "rope", "silu_mul", "paged_attention", "qlinear", "qlinear_a8",
           "linear", "widens", "apply_linear", "rms_norm_ref", "rope_ref", "silu_mul_ref", "paged_attention_ref",
           "qlinear_ref", "qlinear_dequantize", "quantize_activations_ref", "qlinear_a8_ref"]


# ---- references (HF formulas) ----------------------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF MllamaTextRMSNorm. x [..., D], weight [D] -> [..., D]."""
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """HF MllamaRotaryEmbedding + apply_rotary_pos_emb.

    x [B, T, H, D], positions [B, T] int64, inv_freq [D/2] float32 -> [B, T, H, D].
    """
    freqs = positions[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    cos = emb.cos().to(x.dtype)[:, :, None, :]  # [B, T, 1, D]
    sin = emb.sin().to(x.dtype)[:, :, None, :]
    return (x * cos) + (_rotate_half(x) * sin)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF MllamaTextMLP activation: silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up


def qlinear_dequantize(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dense W [N, K] = (q - zero) * scale of a pack-quantized weight (each group's zero and scale repeated), computed
    in `dtype`."""
    K = packed.shape[1] * 32 // bits
    q = unpack(packed, bits, K).to(dtype)  # (N, K)
    if zero is not None:
        q = q - zero.to(dtype).repeat_interleave(group_size, dim=1)
    return q * scale.to(dtype).repeat_interleave(group_size, dim=1)


def qlinear_ref(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
    group_size: int,
) -> torch.Tensor:
    """Weight-only quantized linear: x [..., K] @ W.T with W = (q - zero) * scale in float32 -> [..., N] in x's dtype.

    packed int32 [N, K*bits/32] (quant.packing layout), scale [N, K/group_size], zero int8 [N, K/group_size] or None.
    """
    w = qlinear_dequantize(packed, scale, zero, bits, group_size)  # (N, K) float32
    return (x.float() @ w.T).to(x.dtype)


ACTIVATION_BLOCK = 32  # activation values per int8 scale (cpp/kernels/qlinear_a8.h)
QLINEAR_DECODE_ROWS = 64  # rows of x up to which qlinear_a8 uses int8 activations (kQlinearDecodeRows)


def quantize_activations_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] (K a multiple of 32) -> (xq int8 [..., K], d float32 [..., K/32]): per block of 32 values
    d = max|x| / 127 and xq = round-half-even(x / d) (0 where d = 0), in float32."""
    xb = x.float().unflatten(-1, (-1, ACTIVATION_BLOCK))  # (..., K/32, 32)
    d = xb.abs().amax(-1) / 127.0  # (..., K/32)
    q = torch.where(d[..., None] > 0, (xb / d[..., None]).round(), torch.zeros_like(xb)).clamp(-127, 127)
    return q.to(torch.int8).flatten(-2), d


def qlinear_a8_ref(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
    group_size: int,
) -> torch.Tensor:
    """Quantized linear with int8 activations: x quantized per 32 values (quantize_activations_ref), then
    (d * xq) @ W.T with W = (q - zero) * scale, computed in float64 (the kernel's integer sums are exact, so this is
    the value it rounds) -> [..., N] in x's dtype; more than QLINEAR_DECODE_ROWS rows: qlinear_ref (float32
    products, as the kernel's prefill path). Differentiable in x straight through the rounding (as the op)."""
    if x.shape[-1] % ACTIVATION_BLOCK:
        raise ValueError(f"qlinear_a8: K = {x.shape[-1]} must be a multiple of {ACTIVATION_BLOCK}")
    if x.numel() // x.shape[-1] > QLINEAR_DECODE_ROWS:  # a long prefill: float32 products, as the kernel
        return qlinear_ref(x, packed, scale, zero, bits, group_size)
    xq, d = quantize_activations_ref(x)
    xd = (xq.double().unflatten(-1, (-1, ACTIVATION_BLOCK)) * d.double()[..., None]).flatten(-2)  # (..., K)
    xd = x.double() + (xd - x.double()).detach()  # the rounded values; gradients straight through the rounding
    w = qlinear_dequantize(packed, scale, zero, bits, group_size, torch.float64)  # (N, K)
    return (xd @ w.T).to(x.dtype)
def paged_attention_ref(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                        lengths: torch.Tensor) -> torch.Tensor:
    """Single-query attention over a paged KV cache, row by row (softmax in float32, as HF's eager attention).

    q [B, H, D]; k_pool, v_pool [num_blocks, Hkv, block_size, D]; block_tables [B, max_blocks] (row b's key j in
    block block_tables[b, j // block_size], slot j % block_size); lengths [B]: row b attends to keys [0, lengths[b]).
    -> [B, H, D].
    """
    B, H, D = q.shape
    _, Hkv, bs, _ = k_pool.shape
    out = []
    for b in range(B):
        n = int(lengths[b])
        blocks = block_tables[b, : (n + bs - 1) // bs].long()

        def keys(pool):  # (H, n, D): the row's keys, each KV head repeated for its query heads
            rows = pool[blocks].permute(1, 0, 2, 3).reshape(Hkv, -1, D)[:, :n]
            return rows.repeat_interleave(H // Hkv, dim=0).float()

        scores = torch.einsum("hd,hnd->hn", q[b].float(), keys(k_pool)) * D**-0.5  # (H, n)
        out.append(torch.einsum("hn,hnd->hd", scores.softmax(-1), keys(v_pool)).to(q.dtype))
    return torch.stack(out)  # (B, H, D)


# ---- wrappers ----------------------------------------------------------------------------------------------------


def _native_ok(*tensors: torch.Tensor) -> bool:
    """Whether the native op can run: built, a device with kernels, and no autograd graph to record."""
    if not NATIVE:
        return False
    device = tensors[0].device.type
    if device != "cpu" and not (device == "cuda" and CUDA_KERNELS):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim. x [..., D], weight [D] (x's dtype) -> [..., D]."""
    if _native_ok(x, weight):
        return torch.ops.llama_mm.rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding. x [B, T, H, D] (any strides), positions [B, T] int64, inv_freq [D/2] f32 -> [B, T, H, D]."""
    if _native_ok(x, positions, inv_freq):
        return torch.ops.llama_mm.rope(x, positions, inv_freq)
    return rope_ref(x, positions, inv_freq)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused SwiGLU activation silu(gate) * up; gate and up have the same shape."""
    if _native_ok(gate, up):
        return torch.ops.llama_mm.silu_mul(gate, up)
    return silu_mul_ref(gate, up)


def qlinear(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
    group_size: int,
) -> torch.Tensor:
    """y = x W^T for a pack-quantized int4/int8 W (see qlinear_ref). x [..., K] -> [..., N] in x's dtype."""
    if _native_ok(x, packed, scale):
        return torch.ops.llama_mm.qlinear(x, packed, scale, zero, bits, group_size)
    return qlinear_ref(x, packed, scale, zero, bits, group_size)


def qlinear_a8(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
    group_size: int,
) -> torch.Tensor:
    """y = x W^T with x quantized to int8 per 32 values and integer products (see qlinear_a8_ref); CPU kernel, the
    reference elsewhere. x [..., K] -> [..., N] in x's dtype."""
    if _native_ok(x, packed, scale) and x.device.type == "cpu":
        return torch.ops.llama_mm.qlinear_a8(x, packed, scale, zero, bits, group_size)
    return qlinear_a8_ref(x, packed, scale, zero, bits, group_size)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); x [..., K], weight [N, K], bias [N] -> [..., N]. On a CPU without arithmetic in
    x's 16-bit dtype (bfloat16 without AVX512-BF16, float16 without AVX512-FP16) it runs
    torch.ops.llama_mm.widened_linear instead: float32 GEMMs over widened weight blocks, each output rounded once,
    5-8x faster there (widened_linear.cpp). Elsewhere, and when autograd needs it, F.linear."""
    if widens(x, weight, bias):
        return torch.ops.llama_mm.widened_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def widens(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether `linear` takes widened_linear for these operands (weight [N, K])."""
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return _native_ok(*tensors) and _C.widened_linear_applies(x, weight)


def apply_linear(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), a plain nn.Linear without hooks through `linear` above; any other module (LoRA, quantized,
    hooked) through its own forward."""
    if type(layer) is torch.nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Single-query attention over a paged KV cache (see paged_attention_ref for the shapes)."""
    if _native_ok(q, k_pool, v_pool):
        return torch.ops.llama_mm.paged_attention(q, k_pool, v_pool, block_tables, lengths)
    return paged_attention_ref(q, k_pool, v_pool, block_tables, lengths)


# ---- registrations: fake (meta) implementations for tracing/torch.compile/opcheck, and autograd -----------------

if NATIVE:

    @torch.library.register_fake("llama_mm::rms_norm")
    def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("llama_mm::rope")
    def _rope_fake(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("llama_mm::silu_mul")
    def _silu_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return gate.new_empty(gate.shape)

    @torch.library.register_fake("llama_mm::decode_attention")
    def _decode_attention_fake(q, k_cache, v_cache, key_valid, length):
        return q.new_empty(q.shape)

    @torch.library.register_fake("llama_mm::cross_attention")
    def _cross_attention_fake(q, k, v, mask):
        return q.new_empty(q.shape)

    @torch.library.register_fake("llama_mm::gemv")
    def _gemv_fake(x, weight):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("llama_mm::widened_linear")
    def _widened_linear_fake(x, weight, bias=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("llama_mm::paged_attention")
    def _paged_attention_fake(q, k_pool, v_pool, block_tables, lengths):
        return q.new_empty(q.shape)

    @torch.library.register_fake("llama_mm::qlinear")
    def _qlinear_fake(x, packed, scale, zero, bits, group_size):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))

    @torch.library.register_fake("llama_mm::qlinear_a8")
    def _qlinear_a8_fake(x, packed, scale, zero, bits, group_size):
        return x.new_empty((*x.shape[:-1], packed.shape[0]))


def _register_reference_backward(name: str, reference, n_tensors: int) -> None:
    """Make torch.ops.llama_mm.<name> differentiable: its backward is the gradient of `reference`, recomputed.

    The first `n_tensors` arguments are tensors; the rest (e.g. eps) are passed through.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.rest = inputs[n_tensors:]

    def backward(ctx, grad):
        tensors = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        wanted = [t for t in tensors if t.requires_grad]
        with torch.enable_grad():
            grads = iter(torch.autograd.grad(reference(*tensors, *ctx.rest), wanted, grad))
        return tuple(next(grads) if t.requires_grad else None for t in tensors) + (None,) * len(ctx.rest)

    torch.library.register_autograd(f"llama_mm::{name}", backward, setup_context=setup_context)


if NATIVE:
    _register_reference_backward("rms_norm", rms_norm_ref, 2)
    _register_reference_backward("rope", rope_ref, 3)
    _register_reference_backward("silu_mul", silu_mul_ref, 2)

    def _qlinear_setup_context(ctx, inputs, output):
        x, packed, scale, zero, bits, group_size = inputs
        ctx.save_for_backward(packed, scale, zero)
        ctx.x_dtype, ctx.bits, ctx.group_size = x.dtype, bits, group_size

    def _qlinear_backward(ctx, grad):
        """Gradient w.r.t. x only (the quantized weights are frozen): grad [..., N] @ W -> [..., K]. qlinear_a8 uses
        it too (straight through its activation rounding)."""
        packed, scale, zero = ctx.saved_tensors
        w = qlinear_dequantize(packed, scale, zero, ctx.bits, ctx.group_size)  # (N, K) float32
        return (grad.float() @ w).to(ctx.x_dtype), None, None, None, None, None

    for _name in ("qlinear", "qlinear_a8"):
        torch.library.register_autograd(f"llama_mm::{_name}", _qlinear_backward, setup_context=_qlinear_setup_context)
