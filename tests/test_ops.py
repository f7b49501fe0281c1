"""Native CPU ops torch.ops.llama_mm.* against their pure-PyTorch references (the exact HF Mllama formulas).

Tolerances: float32 1e-6 of the largest reference value; float16/bfloat16 one unit in the last place of it.
"""

import os
import subprocess
import sys

import pytest
import torch

from llama_mm import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |native - ref| allowed, relative to max |ref|
REL_TOL = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def _native_built():
    if not ops.NATIVE:
        pytest.fail(f"llama_mm._C is not built ({ops.NATIVE_ERROR}); run tools/dev_build.sh or pip install")


def assert_matches(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert got.is_contiguous()
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    exact = (got == ref).float().mean().item()
    print(f"{name} {ref.dtype} {tuple(ref.shape)}: max abs diff {diff:.3g} (max |ref| {scale:.3g}), "
          f"bit-exact fraction {exact:.4f}")
    assert diff <= REL_TOL[ref.dtype] * scale, f"{name}: max abs diff {diff} > {REL_TOL[ref.dtype]} * {scale}"


def inv_freq_for(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """RoPE frequencies 1 / theta^(2i/D), float32 [D/2] (the op takes any; the model supplies llama3-scaled ones)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


# ---- rms_norm ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (3, 5, 257), (2, 7, 1000), (4, 1), (6, 15), (2, 3, 8)])
def test_rms_norm_matches_reference(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    assert_matches("rms_norm", torch.ops.llama_mm.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_input(dtype):
    torch.manual_seed(1)
    base = torch.randn(4, 9, 300).to(dtype)
    w = torch.randn(100).to(dtype)
    for x in (base[:, :, 100:200], base.transpose(0, 1)[..., :100], base[:, ::2, :100]):
        assert not x.is_contiguous()
        assert_matches("rms_norm", torch.ops.llama_mm.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6))


# ---- rope --------------------------------------------------------------------------------------------------------


def qkv_view(B, T, H, D, dtype):
    """q as the transformers layout produces it: a non-contiguous [B, T, H, D] view of a fused projection."""
    qkv = torch.randn(B, T, (H + 2 * 2) * D).to(dtype)  # H query heads + 2 KV heads each for k and v
    return qkv[..., : H * D].view(B, T, H, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 32, 128), (2, 7, 3, 64), (3, 5, 2, 10), (2, 9, 4, 66), (1, 3, 1, 2)])
def test_rope_matches_reference(B, T, H, D, dtype):
    torch.manual_seed(2)
    x = qkv_view(B, T, H, D, dtype)
    assert not x.is_contiguous() or B * T == 1  # one token: the view's strides count as contiguous
    # positions not starting at 0, differing per row (left padding / continued decode)
    positions = torch.arange(T)[None, :] + torch.randint(0, 9000, (B, 1))
    inv_freq = inv_freq_for(D)
    assert_matches("rope", torch.ops.llama_mm.rope(x, positions, inv_freq), ops.rope_ref(x, positions, inv_freq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_transposed_input_and_random_positions(dtype):
    torch.manual_seed(3)
    x = torch.randn(2, 4, 6, 32).to(dtype).transpose(1, 2)  # [B, T=6, H=4, D] from a [B, H, T, D] tensor
    positions = torch.randint(0, 100000, (2, 6))
    inv_freq = inv_freq_for(32, theta=10000.0)
    assert_matches("rope", torch.ops.llama_mm.rope(x, positions, inv_freq), ops.rope_ref(x, positions, inv_freq))


# ---- silu_mul ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 14336), (3, 5, 257), (2, 7, 1000), (1, 1), (5, 33)])
def test_silu_mul_matches_reference(shape, dtype):
    torch.manual_seed(4)
    gate = (torch.randn(shape) * 4).to(dtype)
    up = torch.randn(shape).to(dtype)
    assert_matches("silu_mul", torch.ops.llama_mm.silu_mul(gate, up), ops.silu_mul_ref(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_fused_projection_halves_and_extremes(dtype):
    torch.manual_seed(5)
    gate_up = (torch.randn(3, 4, 2 * 300) * 4).to(dtype)
    gate_up[0, 0, :6] = torch.tensor([-100.0, 100.0, -60000.0, 60000.0, 0.0, -0.0]).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # non-contiguous halves of one projection output
    assert not gate.is_contiguous()
    assert_matches("silu_mul", torch.ops.llama_mm.silu_mul(gate, up), ops.silu_mul_ref(gate, up))


# ---- opcheck (schema, fake tensors, autograd registration, AOT dispatch) -----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    torch.manual_seed(6)
    x = torch.randn(3, 5, 64).to(dtype).requires_grad_()
    w = torch.randn(64).to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.llama_mm.rms_norm.default, (x, w, 1e-6))
    torch.library.opcheck(torch.ops.llama_mm.rms_norm.default, (x.detach()[:, 1:], w.detach(), 1e-6))
    q = qkv_view(2, 7, 4, 16, dtype).requires_grad_()
    positions = torch.arange(7)[None, :] + torch.tensor([[3], [50]])
    torch.library.opcheck(torch.ops.llama_mm.rope.default, (q, positions, inv_freq_for(16)))
    gate, up = torch.randn(4, 2 * 10).to(dtype).chunk(2, dim=-1)
    torch.library.opcheck(torch.ops.llama_mm.silu_mul.default, (gate.requires_grad_(), up))


# ---- wrappers ----------------------------------------------------------------------------------------------------


def test_wrappers_use_native_without_grad_and_reference_with_grad():
    torch.manual_seed(7)
    x, w = torch.randn(2, 3, 48), torch.randn(48)
    q, positions, inv_freq = qkv_view(1, 3, 2, 16, torch.float32), torch.tensor([[5, 6, 7]]), inv_freq_for(16)
    gate, up = torch.randn(2, 40), torch.randn(2, 40)
    cases = [
        (ops.rms_norm, torch.ops.llama_mm.rms_norm, ops.rms_norm_ref, (x, w, 1e-6)),
        (ops.rope, torch.ops.llama_mm.rope, ops.rope_ref, (q, positions, inv_freq)),
        (ops.silu_mul, torch.ops.llama_mm.silu_mul, ops.silu_mul_ref, (gate, up)),
    ]
    for wrapper, native, reference, args in cases:
        assert torch.equal(wrapper(*args), native(*args))
        # with an input that requires grad, the wrapper is the reference: same values, same gradients
        first = args[0].detach().clone().requires_grad_()
        out = wrapper(first, *args[1:])
        ref_first = args[0].detach().clone().requires_grad_()
        ref_out = reference(ref_first, *args[1:])
        assert torch.equal(out, ref_out)
        grad = torch.randn_like(ref_out)
        out.backward(grad)
        ref_out.backward(grad)
        assert torch.equal(first.grad, ref_first.grad)
        # the native op called directly under autograd has the reference's gradient too
        native_first = args[0].detach().clone().requires_grad_()
        native(native_first, *args[1:]).backward(grad)
        torch.testing.assert_close(native_first.grad, ref_first.grad, rtol=1e-5, atol=1e-6)


def test_ops_import_without_extension_falls_back_to_reference():
    code = (
        "import sys; sys.modules['llama_mm._C'] = None\n"
        "import torch\n"
        "from llama_mm import ops\n"
        "assert not ops.NATIVE and not hasattr(torch.ops.llama_mm, 'rms_norm')\n"
        "x, w = torch.randn(2, 8), torch.randn(8)\n"
        "assert torch.equal(ops.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6))\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    x, w = torch.randn(2, 8), torch.randn(8)
    q, positions, inv_freq = torch.randn(1, 3, 2, 8), torch.tensor([[0, 1, 2]]), torch.rand(4)
    gate, up = torch.randn(2, 8), torch.randn(2, 8)
    bad = [
        (torch.ops.llama_mm.rms_norm, (x.long(), w, 1e-6), "x must be float32, bfloat16 or float16"),
        (torch.ops.llama_mm.rms_norm, (x, torch.randn(7), 1e-6), r"weight must have shape \[8\]"),
        (torch.ops.llama_mm.rms_norm, (x, w.half(), 1e-6), "weight must have the dtype of x"),
        (torch.ops.llama_mm.rms_norm, (x, w, -1.0), "eps must be >= 0"),
        (torch.ops.llama_mm.rope, (q[0], positions, inv_freq), r"x must have shape \[B, T, H, D\]"),
        (torch.ops.llama_mm.rope, (torch.randn(1, 3, 2, 7), positions, inv_freq), "head dim D must be even"),
        (torch.ops.llama_mm.rope, (q, positions.int(), inv_freq), "positions must be int64"),
        (torch.ops.llama_mm.rope, (q, positions[:, :2], inv_freq), r"positions must have shape \[B, T\]"),
        (torch.ops.llama_mm.rope, (q, positions, torch.rand(3)), r"inv_freq must have shape \[D/2\]"),
        (torch.ops.llama_mm.rope, (q, positions, inv_freq.double()), "inv_freq must be float32"),
        (torch.ops.llama_mm.rope, (q.double(), positions, inv_freq), "x must be float32, bfloat16 or float16"),
        (torch.ops.llama_mm.silu_mul, (gate, up[:, :7]), "up must have the shape of gate"),
        (torch.ops.llama_mm.silu_mul, (gate, up.bfloat16()), "up must have the dtype of gate"),
        (torch.ops.llama_mm.silu_mul, (gate.int(), up.int()), "gate must be float32, bfloat16 or float16"),
    ]
    for op, args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


# ---- CUDA kernels (run where a GPU and a CUDA build are present) -------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.CUDA_KERNELS), reason="no CUDA device or CUDA kernels not built"
)
# GPU reference and kernel use different reduction orders and float32 cos/sin/exp/rsqrt implementations
CUDA_REL_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def assert_matches_cuda(name, got, ref):
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    print(f"cuda {name} {ref.dtype} {tuple(ref.shape)}: max abs diff {diff:.3g} (max |ref| {scale:.3g})")
    assert got.is_cuda and got.is_contiguous() and got.shape == ref.shape and got.dtype == ref.dtype
    assert diff <= CUDA_REL_TOL[ref.dtype] * scale


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_reference(dtype):
    torch.manual_seed(8)
    dev = "cuda"
    # packed (D multiple of 8, aligned) and scalar (odd sizes, misaligned views) paths
    for shape, view in [((3, 4096), slice(None)), ((5, 7, 257), slice(None)), ((4, 301), slice(1, None))]:
        x = torch.randn(shape, device=dev).to(dtype)[..., view]
        w = torch.randn(x.shape[-1], device=dev).to(dtype)
        assert_matches_cuda("rms_norm", torch.ops.llama_mm.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5))
    for B, T, H, D in [(1, 1, 32, 128), (2, 37, 4, 64), (2, 9, 3, 66)]:
        x = qkv_view(B, T, H, D, dtype).to(dev)
        positions = (torch.arange(T)[None, :] + torch.randint(0, 9000, (B, 1))).to(dev)
        inv_freq = inv_freq_for(D).to(dev)
        got = torch.ops.llama_mm.rope(x, positions, inv_freq)
        assert_matches_cuda("rope", got, ops.rope_ref(x, positions, inv_freq))
    for F in (14336, 1001):
        gate, up = (torch.randn(3, 2 * F, device=dev) * 4).to(dtype).chunk(2, dim=-1)
        assert_matches_cuda("silu_mul", torch.ops.llama_mm.silu_mul(gate, up), ops.silu_mul_ref(gate, up))
    x, w = torch.randn(2, 64, device=dev).to(dtype), torch.randn(64, device=dev).to(dtype)
    torch.library.opcheck(torch.ops.llama_mm.rms_norm.default, (x, w, 1e-6))
