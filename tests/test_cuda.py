"""The CUDA kernels and the engine on CUDA, against pure-PyTorch references, the CPU kernels and transformers.

Skipped, with the reason, when there is no CUDA device or llama_mm._C was built without CUDA kernels. Kernel
tolerances are those of the CPU tests (tests/test_ops.py, tests/test_engine.py); every comparison prints its max
difference.
"""
import pytest
import torch

from llama_mm import ops
from llama_mm.engine import request_tensors
from references import attention_ref

if not torch.cuda.is_available():
    SKIP = "no CUDA device (torch.cuda.is_available() is False)"
elif ops.NATIVE and not ops.CUDA_KERNELS:
    SKIP = "llama_mm._C was built without CUDA kernels (building them needs nvcc and a CUDA build of torch)"
else:
    SKIP = None
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

DEV = "cuda"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# max |cuda - ref| allowed relative to max |ref| for the elementwise ops (as tests/test_ops.py)
REL_TOL = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# attention: max |cuda - float64 ref| allowed, times max(1, max |ref|) (as tests/test_engine.py)
ATTN_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _native_built():
    if not ops.NATIVE:
        pytest.fail(f"llama_mm._C is not built ({ops.NATIVE_ERROR}); run tools/dev_build.sh or pip install")


def assert_matches(name, got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
    assert got.is_contiguous()
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    print(f"{name} {ref.dtype} {tuple(ref.shape)}: max abs diff {diff:.3g} (max |ref| {scale:.3g})")
    assert diff <= REL_TOL[ref.dtype] * scale, f"{name}: max abs diff {diff} > {REL_TOL[ref.dtype]} * {scale}"


def inv_freq_for(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


# ---- rms_norm, rope, silu_mul against the pure-torch references on the GPU ----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (3, 5, 257), (2, 7, 1000), (4, 1), (6, 15), (2, 3, 8), (1, 8192)])
def test_rms_norm(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 3).to(dtype).to(DEV)
    w = torch.randn(shape[-1], generator=g).to(dtype).to(DEV)
    assert_matches("rms_norm", torch.ops.llama_mm.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_and_unaligned(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 9, 301, generator=g).to(dtype).to(DEV)
    w = torch.randn(100, generator=g).to(dtype).to(DEV)
    for x in (base[:, :, 100:200], base.transpose(0, 1)[..., :100], base[:, ::2, 1:101]):
        assert not x.is_contiguous()
        assert_matches("rms_norm", torch.ops.llama_mm.rms_norm(x, w, 1e-6), ops.rms_norm_ref(x, w, 1e-6))


def qkv_view(B, T, H, D, dtype, g):
    """q as a fused projection produces it: a non-contiguous [B, T, H, D] view."""
    qkv = torch.randn(B, T, (H + 4) * D, generator=g).to(dtype).to(DEV)
    return qkv[..., : H * D].view(B, T, H, D)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(1, 1, 32, 128), (2, 7, 3, 64), (3, 5, 2, 10), (2, 9, 4, 66), (1, 3, 1, 2),
                                     (1, 300, 8, 128)])
def test_rope(B, T, H, D, dtype):
    g = torch.Generator().manual_seed(2)
    x = qkv_view(B, T, H, D, dtype, g)
    positions = (torch.arange(T)[None, :] + torch.randint(0, 9000, (B, 1), generator=g)).to(DEV)
    inv_freq = inv_freq_for(D).to(DEV)
    assert_matches("rope", torch.ops.llama_mm.rope(x, positions, inv_freq), ops.rope_ref(x, positions, inv_freq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_transposed_input_and_far_positions(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 6, 32, generator=g).to(dtype).to(DEV).transpose(1, 2)  # [B, T, H, D] from [B, H, T, D]
    positions = torch.randint(0, 100000, (2, 6), generator=g).to(DEV)
    inv_freq = inv_freq_for(32, theta=10000.0).to(DEV)
    assert_matches("rope", torch.ops.llama_mm.rope(x, positions, inv_freq), ops.rope_ref(x, positions, inv_freq))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 14336), (3, 5, 257), (2, 7, 1000), (1, 1), (5, 33), (32, 14336)])
def test_silu_mul(shape, dtype):
    g = torch.Generator().manual_seed(4)
    gate = (torch.randn(shape, generator=g) * 4).to(dtype).to(DEV)
    up = torch.randn(shape, generator=g).to(dtype).to(DEV)
    assert_matches("silu_mul", torch.ops.llama_mm.silu_mul(gate, up), ops.silu_mul_ref(gate, up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_fused_halves_and_extremes(dtype):
    g = torch.Generator().manual_seed(5)
    gate_up = (torch.randn(3, 4, 2 * 301, generator=g) * 4).to(dtype)
    gate_up[0, 0, :6] = torch.tensor([-100.0, 100.0, -60000.0, 60000.0, 0.0, -0.0]).to(dtype)
    gate_up[0, 0, 301:307] = 0.5  # their up values: products inside the float16 range
    gate, up = gate_up.to(DEV).chunk(2, dim=-1)  # non-contiguous, and the second half not 16-byte aligned
    assert not gate.is_contiguous()
    assert_matches("silu_mul", torch.ops.llama_mm.silu_mul(gate, up), ops.silu_mul_ref(gate, up))


def test_elementwise_ops_match_cpu_kernels():
    """The CUDA and CPU kernels of the same op agree (float32)."""
    g = torch.Generator().manual_seed(6)
    x, w = torch.randn(3, 7, 4096, generator=g), torch.randn(4096, generator=g)
    q, pos, f = torch.randn(2, 5, 8, 128, generator=g), torch.randint(0, 5000, (2, 5), generator=g), inv_freq_for(128)
    gate, up = torch.randn(4, 14336, generator=g), torch.randn(4, 14336, generator=g)
    for name, op, args in [("rms_norm", torch.ops.llama_mm.rms_norm, (x, w, 1e-5)),
                           ("rope", torch.ops.llama_mm.rope, (q, pos, f)),
                           ("silu_mul", torch.ops.llama_mm.silu_mul, (gate, up))]:
        cpu = op(*args)
        cuda = op(*[a.to(DEV) if isinstance(a, torch.Tensor) else a for a in args])
        assert_matches(name, cuda.cpu(), cpu)


# ---- attention -------------------------------------------------------------------------------------------------




def decode_ref(q, k_cache, v_cache, valid, length):
    """The decode semantics: slots [0, length); invalid slots get no weight, unless a row has no valid slot, which
    then attends uniformly (the lowest-float mask)."""
    ok = valid[:, :length]
    none = ~ok.any(1)  # rows with no valid slot
    additive = torch.zeros(ok.shape, dtype=torch.float64, device=q.device).masked_fill(~ok, float("-inf"))
    additive[none] = 0.0
    out = attention_ref(q, k_cache[:, :, :length], v_cache[:, :, :length], additive)
    G = q.shape[1] // k_cache.shape[1]
    out[none] = v_cache[none, :, :length].double().mean(2).repeat_interleave(G, 1)  # equal scores: the mean of v
    return out


def check_attention(name, out, expected, dtype):
    err = (out.double() - expected).abs().max().item()
    bound = ATTN_TOL[dtype] * max(1.0, expected.abs().max().item())
    print(f"{name} {dtype} {tuple(out.shape)}: max abs diff {err:.2e} (bound {bound:.1e})")
    assert out.dtype == dtype and out.device == expected.device and out.is_contiguous() and err < bound


def random_cache(B, H, Hkv, S_max, D, dtype, seed):
    """q [B, H, D] and a KV cache [B, Hkv, S_max, D] of random values, drawn on the GPU."""
    g = torch.Generator(DEV).manual_seed(seed)
    q = torch.randn(B, H, D, generator=g, device=DEV).to(dtype)
    kc = torch.randn(B, Hkv, S_max, D, generator=g, device=DEV).to(dtype)
    vc = torch.randn(B, Hkv, S_max, D, generator=g, device=DEV).to(dtype)
    return q, kc, vc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,S,S_max,D", [
    (1, 4, 2, 17, 24, 64), (3, 8, 8, 5, 5, 16), (2, 6, 1, 300, 307, 40), (1, 32, 8, 2049, 2056, 128),
    (1, 32, 8, 8192, 8192, 128), (1, 32, 8, 700, 32768, 128), (2, 32, 8, 32768, 32768, 128),
    (2, 16, 1, 1000, 1100, 256), (3, 24, 2, 129, 4000, 80), (1, 2, 2, 1, 9, 6),
])
def test_decode_attention(dtype, B, H, Hkv, S, S_max, D):
    q, kc, vc = random_cache(B, H, Hkv, S_max, D, dtype, seed=S + D)
    q = (q.float() * 3).to(dtype)  # peaked softmax: outputs of order 1 even over 32k slots, a sharper check
    valid = torch.ones(B, S_max, dtype=torch.bool, device=DEV)
    valid[0, : S // 3] = False  # left padding on row 0
    if B > 2:
        valid[2] = False  # a row with no valid slot at all: uniform attention
    out = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, torch.tensor([S], device=DEV))
    check_attention("decode_attention", out, decode_ref(q, kc, vc, valid, S), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_strided_and_unaligned(dtype):
    """Views with odd strides and offsets (the scalar-load path) give the same as contiguous copies."""
    g = torch.Generator().manual_seed(7)
    B, H, Hkv, S, D = 2, 8, 2, 333, 64
    q = torch.randn(B, H, D + 1, generator=g).to(dtype).to(DEV)[..., 1:]  # 2-byte / 4-byte offset: unaligned
    big_k = torch.randn(B, S, Hkv, D, generator=g).to(dtype).to(DEV)
    k = big_k.transpose(1, 2)  # [B, Hkv, S, D] with slot stride Hkv * D
    v = torch.randn(B, Hkv, S, D + 3, generator=g).to(dtype).to(DEV)[..., :D]
    valid = torch.rand(B, S, generator=g).to(DEV) > 0.2
    out = torch.ops.llama_mm.decode_attention(q, k, v, valid, torch.tensor([S - 5], device=DEV))
    check_attention("decode_attention strided", out, decode_ref(q, k, v, valid, S - 5), dtype)


def test_decode_attention_reads_length_on_device_and_under_cuda_graph():
    """The length is read by the kernel: changing the tensor in place (no new call arguments) changes the result,
    and a captured CUDA graph replays with the current value."""
    q, kc, vc = random_cache(1, 32, 8, 4096, 128, torch.bfloat16, seed=9)
    valid = torch.ones(1, 4096, dtype=torch.bool, device=DEV)
    length = torch.tensor([10], device=DEV)
    stream = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation does
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.llama_mm.decode_attention(q, kc, vc, valid, length)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, length)
    for n in (1, 10, 63, 64, 65, 1000, 4096):
        length.fill_(n)
        graph.replay()
        eager = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, length)
        assert torch.equal(out, eager), f"graph replay differs from the eager call at length {n}"
        check_attention(f"decode_attention graph length={n}", out, decode_ref(q, kc, vc, valid, n), torch.bfloat16)


def test_decode_attention_length_is_clamped_to_the_cache():
    """A length outside [1, S_max] cannot be checked on the host without a sync: the kernel clamps it."""
    q, kc, vc = random_cache(2, 4, 2, 50, 32, torch.float32, seed=10)
    valid = torch.ones(2, 50, dtype=torch.bool, device=DEV)
    run = lambda n: torch.ops.llama_mm.decode_attention(q, kc, vc, valid, torch.tensor([n], device=DEV))
    assert torch.equal(run(0), run(1)) and torch.equal(run(-3), run(1))
    assert torch.equal(run(51), run(50)) and torch.equal(run(10**9), run(50))


def test_decode_attention_never_reads_masked_slots_into_the_result():
    """Masked slots (left padding) holding NaN leave the output untouched, as in the CPU kernel, which skips
    zero-weight keys: here whole chunks of the cache are masked."""
    q, kc, vc = random_cache(2, 32, 8, 5000, 128, torch.bfloat16, seed=16)
    valid = torch.ones(2, 5000, dtype=torch.bool, device=DEV)
    valid[0, :3000] = False
    length = torch.tensor([4321], device=DEV)
    clean = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, length)
    kc[0, :, :3000], vc[0, :, :3000] = float("nan"), float("nan")
    dirty = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, length)
    assert torch.equal(clean, dirty)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_matches_cpu_kernel(dtype):
    q, kc, vc = random_cache(2, 32, 8, 600, 128, dtype, seed=11)
    valid = torch.ones(2, 600, dtype=torch.bool, device=DEV)
    valid[1, :37] = False
    cuda = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, torch.tensor([555], device=DEV))
    cpu = torch.ops.llama_mm.decode_attention(q.cpu(), kc.cpu(), vc.cpu(), valid.cpu(), torch.tensor([555]))
    check_attention("decode_attention vs cpu", cuda.cpu(), cpu.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,tiles,D", [(1, 32, 8, 4, 128), (2, 32, 8, 8, 128), (2, 8, 2, 3, 32),
                                             (1, 6, 3, 1, 40), (3, 4, 4, 2, 64)])
def test_cross_attention(dtype, B, H, Hkv, tiles, D):
    g = torch.Generator().manual_seed(tiles * D)
    S = tiles * 1601  # vision tokens: 1601 per tile
    q = torch.randn(B, H, D, generator=g).to(dtype).to(DEV)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(DEV)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype).to(DEV)
    mask = torch.zeros(B, S, device=DEV)
    mask[0, 1601:] = torch.finfo(torch.float32).min  # row 0 sees the first tile only
    if B > 1:
        mask[1] = torch.finfo(torch.float32).min  # row 1 sees nothing: uniform over every key
    out = torch.ops.llama_mm.cross_attention(q, k, v, mask)
    check_attention("cross_attention", out, attention_ref(q, k, v, mask), dtype)
    # the model's own mask is in the model dtype: a bfloat16 / float16 finfo.min mask
    out_typed = torch.ops.llama_mm.cross_attention(q, k, v, mask.clamp_min(torch.finfo(dtype).min).to(dtype))
    check_attention("cross_attention typed mask", out_typed, attention_ref(q, k, v, mask.clamp_min(
        torch.finfo(dtype).min).to(dtype)), dtype)
    no_mask = torch.ops.llama_mm.cross_attention(q, k, v, None)
    check_attention("cross_attention no mask", no_mask, attention_ref(q, k, v, torch.zeros(B, S, device=DEV)), dtype)


def test_cross_attention_minus_inf_mask():
    """An additive -inf mask (as SDPA users write it) over whole chunks of keys: those keys get no weight."""
    g = torch.Generator(DEV).manual_seed(17)
    q, k, v = (torch.randn(shape, generator=g, device=DEV) for shape in ((1, 32, 128), (1, 8, 3 * 1601, 128),
                                                                          (1, 8, 3 * 1601, 128)))
    mask = torch.zeros(1, 3 * 1601, device=DEV)
    mask[0, 1601:] = float("-inf")
    out = torch.ops.llama_mm.cross_attention(q, k, v, mask)
    check_attention("cross_attention -inf mask", out, attention_ref(q, k, v, mask), torch.float32)


def test_cross_attention_matches_cpu_kernel():
    g = torch.Generator().manual_seed(12)
    q, k, v = torch.randn(2, 32, 128, generator=g), torch.randn(2, 8, 3202, 128, generator=g), \
        torch.randn(2, 8, 3202, 128, generator=g)
    mask = torch.zeros(2, 3202)
    mask[1, :1601] = torch.finfo(torch.float32).min
    cpu = torch.ops.llama_mm.cross_attention(q, k, v, mask)
    cuda = torch.ops.llama_mm.cross_attention(q.to(DEV), k.to(DEV), v.to(DEV), mask.to(DEV))
    check_attention("cross_attention vs cpu", cuda.cpu(), cpu.double(), torch.float32)


def test_attention_bad_inputs():
    q, kc, vc = random_cache(2, 4, 2, 6, 8, torch.float32, seed=13)
    valid = torch.ones(2, 6, dtype=torch.bool, device=DEV)
    length = torch.tensor([3], device=DEV)
    bad = [
        ((q, kc, vc, valid, torch.tensor([3])), "length must be a one-element int64 tensor on cuda"),
        ((q, kc, vc, valid, length.float()), "one-element int64"),
        ((q, kc, vc, valid[:, :5], length), "key_valid must be a bool"),
        ((q, kc, vc, valid.float(), length), "key_valid must be a bool"),
        ((q, kc.cpu(), vc, valid, length), "k must be on the device of q"),
        ((q, kc, vc.half(), valid, length), "share a dtype"),
        ((torch.randn(2, 3, 8, device=DEV), kc, vc, valid, length), "not a multiple of kv heads"),
        ((q.transpose(1, 2).contiguous().transpose(1, 2)[:, :, :4], kc[..., :4], vc[..., :4], valid, length),
         "head_dim must be contiguous"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.llama_mm.decode_attention(*args)
    big = torch.randn(1, 2, 300, device=DEV)
    with pytest.raises(RuntimeError, match=r"head_dim must be in \[1, 256\]"):
        torch.ops.llama_mm.cross_attention(big, torch.randn(1, 1, 4, 300, device=DEV),
                                           torch.randn(1, 1, 4, 300, device=DEV), None)
    with pytest.raises(RuntimeError, match=r"mask must be \[B, S\]"):
        torch.ops.llama_mm.cross_attention(q, kc, vc, torch.zeros(2, 5, device=DEV))
    with pytest.raises(RuntimeError, match="mask must be on the device of q"):
        torch.ops.llama_mm.cross_attention(q, kc, vc, torch.zeros(2, 6))


# ---- opcheck on CUDA inputs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 5, 64, generator=g).to(dtype).to(DEV).requires_grad_()
    w = torch.randn(64, generator=g).to(dtype).to(DEV).requires_grad_()
    torch.library.opcheck(torch.ops.llama_mm.rms_norm.default, (x, w, 1e-6))
    q = qkv_view(2, 7, 4, 16, dtype, g).requires_grad_()
    positions = (torch.arange(7)[None, :] + torch.tensor([[3], [50]])).to(DEV)
    torch.library.opcheck(torch.ops.llama_mm.rope.default, (q, positions, inv_freq_for(16).to(DEV)))
    gate, up = torch.randn(4, 2 * 10, generator=g).to(dtype).to(DEV).chunk(2, dim=-1)
    torch.library.opcheck(torch.ops.llama_mm.silu_mul.default, (gate.requires_grad_(), up))
    q, kc, vc = random_cache(2, 4, 2, 70, 8, dtype, seed=15)
    valid = torch.ones(2, 70, dtype=torch.bool, device=DEV)
    torch.library.opcheck(torch.ops.llama_mm.decode_attention.default,
                          (q, kc, vc, valid, torch.tensor([65], device=DEV)))
    torch.library.opcheck(torch.ops.llama_mm.cross_attention.default, (q, kc, vc, torch.zeros(2, 70, device=DEV)))
    torch.library.opcheck(torch.ops.llama_mm.cross_attention.default, (q, kc, vc, None))


# ---- the engine on CUDA ------------------------------------------------------------------------------------------

N = 64


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(transformers reference on the CPU, CUDA model, CUDA engine, CPU engine), all float32, same checkpoint."""
    import llama_mm
    from llama_mm.engine import Engine
    from checkpoints import build_reference, write_checkpoint

    # float32 means float32: no TF32 in cuBLAS or cuDNN (the vision tower's patch convolution)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    ref = build_reference(attn_implementation="sdpa", seed=21)
    path = write_checkpoint(tmp_path_factory.mktemp("ck"), ref)
    cuda_model = llama_mm.load_model(path, device=DEV, dtype="float32")
    cpu_model = llama_mm.load_model(path, dtype="float32")
    yield ref, cuda_model, Engine(cuda_model), Engine(cpu_model)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


CASES = {
    "text-only": dict(with_image=False),
    "one-image-2x2": dict(aspect_ratios=((2, 2),)),
    "two-images": dict(images_per_row=2, aspect_ratios=((1, 2), (2, 2))),
    "padded-batch": dict(batch=2, left_pad=(4, 0), aspect_ratios=((2, 1), (1, 1))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_greedy_identical_to_cpu_engine_and_transformers(engines, case):
    from checkpoints import random_inputs

    ref, _, cuda_engine, cpu_engine = engines
    inputs = random_inputs(ref, seq=12, seed=len(case), **CASES[case])
    ours = cuda_engine.run(inputs, N)
    cpu = cpu_engine.run(inputs, N)
    with torch.no_grad():
        theirs = ref.generate(**inputs, max_new_tokens=N, do_sample=False, pad_token_id=0,
                              eos_token_id=None)[:, inputs["input_ids"].shape[1]:]
    assert ours.shape == theirs.shape == (inputs["input_ids"].shape[0], N)
    assert torch.equal(ours, cpu), f"CUDA vs CPU engine: first difference at {(ours != cpu).nonzero()[:1].tolist()}"
    assert torch.equal(ours, theirs), f"first difference at {(ours != theirs).nonzero()[:1].tolist()}"


def step_logits(engine, inputs, tokens):
    """Prefill, then one step per column of tokens [B, n]: the logits [n + 1, B, V] on the CPU. (step() returns the
    engine's own logits buffer, overwritten by the next step: copied here.)"""
    args = request_tensors(engine, inputs)
    out = [engine.native.start(*args, tokens.shape[1] + 1).to("cpu", copy=True)]
    for i in range(tokens.shape[1]):
        out.append(engine.native.step(tokens[:, i].to(engine.model.device)).to("cpu", copy=True))
    return torch.stack(out)


@pytest.mark.parametrize("case", ["one-image-2x2", "padded-batch"])
def test_engine_graph_replay_matches_eager(engines, case):
    """An engine runs its first step eagerly and then replays a graph captured once per request: every step's
    logits match the CPU engine's eager steps and the PyTorch model's forward over the whole sequence, on two
    requests in a row (new caches, a new capture); a captured step matches the same step run eagerly on the GPU."""
    from checkpoints import random_inputs
    from llama_mm.engine import Engine

    ref, cuda_model, cuda_engine, cpu_engine = engines
    fresh = Engine(cuda_model)  # never stepped: its first step runs eagerly
    for seed, seq in ((3, 9), (4, 14)):  # the second request's steps are all graph replays
        inputs = random_inputs(ref, seq=seq, seed=seed, **CASES[case])
        B = inputs["input_ids"].shape[0]
        tokens = torch.randint(3, 300, (B, 6), generator=torch.Generator().manual_seed(seed))
        cuda = step_logits(cuda_engine, inputs, tokens)
        cpu = step_logits(cpu_engine, inputs, tokens)
        if seed == 4:
            eager = step_logits(fresh, inputs, tokens[:, :1])  # prefill and one eager step
            scale = eager.abs().max().item()
            diff = (cuda[:2] - eager).abs().max().item()
            print(f"{case}: captured vs eager CUDA step max abs diff {diff:.2e}")
            torch.testing.assert_close(cuda[:2], eager, rtol=1e-6, atol=1e-6 * scale)
        for i in range(len(cuda)):
            scale = cpu[i].abs().max().item()
            diff = (cuda[i] - cpu[i]).abs().max().item()
            print(f"{case} request {seed} step {i}: CUDA vs CPU engine max abs diff {diff:.2e} (max |logit| {scale:.1f})")
            torch.testing.assert_close(cuda[i], cpu[i], rtol=1e-5, atol=1e-5 * scale)
        # the whole sequence through the PyTorch model on the GPU, last position of each prefix
        ids = torch.cat([inputs["input_ids"], tokens], 1)
        n_new = tokens.shape[1]
        full = {k: v.to(DEV) for k, v in inputs.items()}
        full["input_ids"] = ids.to(DEV)
        full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1).to(DEV)
        if "cross_attention_mask" in inputs:
            xm = inputs["cross_attention_mask"]
            full["cross_attention_mask"] = torch.cat([xm] + [xm[:, -1:]] * n_new, 1).to(DEV)
        mask = full["attention_mask"]
        full["position_ids"] = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)
        with torch.no_grad():
            logits = cuda_model(**full).logits.cpu()  # [B, T + n, V]
        T = inputs["input_ids"].shape[1]
        for i in range(len(cuda)):
            expected = logits[:, T - 1 + i]
            torch.testing.assert_close(cuda[i], expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_engine_decode_step_replays_a_cuda_graph(engines):
    """Steps after the first launch one captured graph (seen as cudaGraphLaunch by the profiler), not the step's
    hundreds of kernels one by one (at most the copy of the new tokens into the graph's input)."""
    from checkpoints import random_inputs
    from torch.profiler import ProfilerActivity, profile

    ref, _, cuda_engine, _ = engines
    inputs = random_inputs(ref, seq=8, seed=5, aspect_ratios=((1, 1),))
    cuda_engine.native.start(*request_tensors(cuda_engine, inputs), 8)
    token = torch.tensor([7], device=DEV)
    for _ in range(3):  # eager warm-up (first engine use), capture, replay
        cuda_engine.native.step(token)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        cuda_engine.native.step(token)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    launches = [n for n in names if n.startswith("cudaLaunchKernel")]
    if not any(n.startswith("cuda") for n in names):
        pytest.skip("the profiler recorded no CUDA runtime calls (CUPTI unavailable)")
    assert any(n.startswith("cudaGraphLaunch") for n in names), sorted(set(names))[:50]
    assert len(launches) <= 1, f"{len(launches)} kernels launched outside the graph"
