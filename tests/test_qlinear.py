"""torch.ops.llama_mm.qlinear (weight-only int4/int8 linear) and quant.packing.

Oracles: compressed-tensors' own pack_to_int32 / unpack_from_int32 and dequantize (the Hub format's reference code),
and ops.qlinear_ref (unpack -> dense float32 W -> x.float() @ W.T). Tolerances on max |native - oracle|, relative
to max |oracle|: float32 1e-5 (the kernel sums in another order and folds the storage offset into the zero point),
bfloat16 / float16 output one unit in the last place (two float32 sums that differ in their last bits can round
to neighbouring values).
"""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize

from llama_mm import ops
from llama_mm.quant import packing

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REL_TOL = {torch.float32: 1e-5, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
DECODE_ROWS = 64  # rows up to which the CPU kernel is batch-invariant (cpp/kernels/qlinear.h kQlinearDecodeRows)


def quantized(N, K, bits, group_size, asymmetric, scale_dtype=torch.float32, seed=0, device="cpu"):
    """Random pack-quantized weight: (packed int32 [N, K*bits/32], scale [N, G], zero int8 [N, G] or None, q)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (N, K), generator=g, dtype=torch.int8)
    G = K // group_size
    scale = (torch.rand(N, G, generator=g) * 0.02 + 0.001).to(scale_dtype)
    zero = torch.randint(lo, hi + 1, (N, G), generator=g, dtype=torch.int8) if asymmetric else None
    packed = packing.pack(q, bits)
    to = (lambda t: None if t is None else t.to(device))
    return to(packed), to(scale), to(zero), q.to(device)


def assert_close(name, got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    diff = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    print(f"{name} {ref.dtype} {tuple(ref.shape)}: max abs diff {diff:.3g} (max |ref| {scale:.3g})")
    assert diff <= REL_TOL[ref.dtype] * scale, f"{name}: max abs diff {diff} > {REL_TOL[ref.dtype]} * {scale}"


@pytest.fixture
def native():
    if not ops.NATIVE:
        pytest.fail(f"llama_mm._C is not built ({ops.NATIVE_ERROR}); run tools/dev_build.sh or pip install")


# ---- packing against compressed-tensors --------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_compressed_tensors(bits):
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 96), generator=torch.Generator().manual_seed(1),
                      dtype=torch.int8)
    q[0, :4] = torch.tensor([-(1 << (bits - 1)), (1 << (bits - 1)) - 1, 0, -1])  # both ends of the range
    packed = packing.pack(q, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, 96 * bits // 32)
    assert torch.equal(packed, pack_to_int32(q, bits))
    assert torch.equal(packing.unpack(packed, bits, 96), q)
    assert torch.equal(unpack_from_int32(packed, bits, q.shape), q)


def test_pack_layout_by_hand():
    # int4: value k at bits 4k of word 0, stored as q + 8
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    assert packing.pack(q, 4).tolist() == [[int.from_bytes(bytes([0x10, 0x98, 0xBA, 0xFE]), "little", signed=True)]]
    q8 = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    assert packing.pack(q8, 8).tolist() == [[int.from_bytes(bytes([0x00, 0x7F, 0x80, 0xFF]), "little", signed=True)]]


def test_packing_errors():
    with pytest.raises(ValueError, match="K = 12 is not a multiple of 8"):
        packing.pack(torch.zeros(2, 12, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match=r"values must lie in \[-8, 7\].*got \[-8, 8\]"):
        packing.pack(torch.tensor([[8, -8, 0, 0, 0, 0, 0, 0]]), 4)
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        packing.pack(torch.zeros(2, 32, dtype=torch.int8), 3)
    with pytest.raises(ValueError, match=r"packed must be int32 \[N, 4\]"):
        packing.unpack(torch.zeros(2, 3, dtype=torch.int32), 4, 32)


# ---- the op against the references -------------------------------------------------------------------------------


def ct_dense(q, scale, zero, bits, group_size):
    """W [N, K] as compressed-tensors dequantizes it (in the scale's dtype)."""
    args = QuantizationArgs(num_bits=bits, strategy="group", group_size=group_size, symmetric=zero is None)
    return dequantize(q, scale, zero, args=args)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, 256])  # 256 = K: the "channel" strategy
@pytest.mark.parametrize("M", [1, 3, 8, 9, 70])
def test_qlinear_matches_compressed_tensors(native, bits, asymmetric, group_size, M):
    N, K = 40, 256
    packed, scale, zero, q = quantized(N, K, bits, group_size, asymmetric, seed=M)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(2))
    w = ct_dense(q, scale, zero, bits, group_size)  # float32 scale -> float32 W, exactly (q - zero) * scale
    expect = torch.nn.functional.linear(x, w)
    assert_close("qlinear vs compressed-tensors", torch.ops.llama_mm.qlinear(x, packed, scale, zero, bits, group_size),
                 expect)
    assert torch.equal(ops.qlinear_dequantize(packed, scale, zero, bits, group_size), w)


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("scale_dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 2, 5, 65])
def test_qlinear_dtypes(native, x_dtype, scale_dtype, M):
    packed, scale, zero, _ = quantized(24, 128, 4, 32, True, scale_dtype=scale_dtype, seed=3)
    x = (torch.randn(M, 128, generator=torch.Generator().manual_seed(4)) * 2).to(x_dtype)
    assert_close("qlinear", torch.ops.llama_mm.qlinear(x, packed, scale, zero, 4, 32),
                 ops.qlinear_ref(x, packed, scale, zero, 4, 32))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("K, group_size", [(96, 32), (104, 8), (40, 40), (24, 4), (72, 24)])
def test_qlinear_odd_shapes(native, bits, K, group_size):
    # K and groups not multiples of the SIMD width; groups of 4 / 24 take the scalar path
    packed, scale, zero, _ = quantized(13, K, bits, group_size, True, seed=K)
    for M in (1, 4, 6, 66):
        x = torch.randn(2, M, K, generator=torch.Generator().manual_seed(M))[:, :, :].transpose(0, 1)  # strided
        assert_close(f"qlinear K={K} g={group_size} M={M}", torch.ops.llama_mm.qlinear(x, packed, scale, zero, bits,
                     group_size), ops.qlinear_ref(x, packed, scale, zero, bits, group_size))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlinear_batch_invariant(native, bits, dtype):
    """Row r of an M-row call (M <= 64) is bitwise the row computed alone, wherever it sits."""
    N, K = 67, 384
    packed, scale, zero, _ = quantized(N, K, bits, 128, True, seed=5)
    x = torch.randn(DECODE_ROWS, K, generator=torch.Generator().manual_seed(6)).to(dtype)
    alone = torch.cat([torch.ops.llama_mm.qlinear(x[r:r + 1], packed, scale, zero, bits, 128) for r in
                       range(DECODE_ROWS)])
    for M in (2, 3, 4, 5, 7, 8, 9, 17, 33, 64):
        for start in sorted({0, 1, DECODE_ROWS - M}):
            y = torch.ops.llama_mm.qlinear(x[start:start + M], packed, scale, zero, bits, 128)
            assert torch.equal(y, alone[start:start + M]), f"M={M}, rows from {start}"


def test_qlinear_leading_dims_and_wrapper(native):
    packed, scale, zero, _ = quantized(16, 64, 8, 32, False, seed=7)
    x = torch.randn(2, 3, 64)
    y = ops.qlinear(x, packed, scale, None, 8, 32)
    assert y.shape == (2, 3, 16)
    assert_close("qlinear 3-D", y, ops.qlinear_ref(x, packed, scale, None, 8, 32))


def test_qlinear_grad_x(native):
    # the wrapper falls back to the (differentiable) reference; the op itself has a backward w.r.t. x
    packed, scale, zero, _ = quantized(12, 64, 4, 32, True, seed=8)
    x = torch.randn(3, 64, requires_grad=True)
    grad = torch.randn(3, 12)
    torch.ops.llama_mm.qlinear(x, packed, scale, zero, 4, 32).backward(grad)
    w = ops.qlinear_dequantize(packed, scale, zero, 4, 32)
    assert_close("qlinear grad x", x.grad, grad @ w)


@pytest.mark.parametrize("M", [2, 70])
def test_qlinear_opcheck(native, M):
    packed, scale, zero, _ = quantized(16, 64, 4, 32, True, seed=9)
    x = torch.randn(M, 64, requires_grad=True)
    torch.library.opcheck(torch.ops.llama_mm.qlinear.default, (x, packed, scale, zero, 4, 32))
    torch.library.opcheck(torch.ops.llama_mm.qlinear.default, (x.detach().bfloat16(), packed, scale, None, 4, 32))


# ---- bad arguments -----------------------------------------------------------------------------------------------


def test_qlinear_bad_arguments(native):
    packed, scale, zero, _ = quantized(8, 64, 4, 32, True, seed=10)
    x = torch.randn(2, 64)
    op = torch.ops.llama_mm.qlinear

    def fails(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args)

    fails(r"llama_mm.qlinear: bits must be 4 or 8, got 2", x, packed, scale, zero, 2, 32)
    fails(r"llama_mm.qlinear: group_size must divide K = 64 .*got 48", x, packed, scale, zero, 4, 48)
    fails(r"llama_mm.qlinear: group_size must divide K = 64 .*got 0", x, packed, scale, zero, 4, 0)
    fails(r"llama_mm.qlinear: K = 60 must be a multiple of 8", torch.randn(2, 60), packed, scale, zero, 4, 4)
    fails(r"llama_mm.qlinear: x must be float32, bfloat16 or float16, got Long", x.long(), packed, scale, zero, 4, 32)
    fails(r"llama_mm.qlinear: packed must be int32, got Long", x, packed.long(), scale, zero, 4, 32)
    fails(r"llama_mm.qlinear: packed must have shape \[N, 16\] \(K \* bits / 32 for K = 64, bits = 8\), got \[8, 8\]",
          x, packed, scale, zero, 8, 32)
    fails(r"llama_mm.qlinear: scale must have shape \[N, K / group_size\] = \[8, 2\], got \[8, 3\]",
          x, packed, torch.ones(8, 3), zero, 4, 32)
    fails(r"llama_mm.qlinear: scale must be float32, bfloat16 or float16, got Int", x, packed, scale.int(), zero, 4,
          32)
    fails(r"llama_mm.qlinear: zero must be int8, got Int", x, packed, scale, zero.int(), 4, 32)
    fails(r"llama_mm.qlinear: zero must have shape \[N, K / group_size\] = \[8, 2\], got \[2, 8\]",
          x, packed, scale, zero.t().contiguous(), 4, 32)
    fails(r"llama_mm.qlinear: x must have K > 0", torch.randn(2, 0), packed[:, :0], scale[:, :0], None, 4, 1)
    fails(r"llama_mm.qlinear: x must have shape \[..., K\], got a 0-dim tensor", torch.tensor(1.0), packed, scale,
          zero, 4, 32)


# ---- CUDA --------------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and ops.CUDA_KERNELS),
                                reason="needs a CUDA device and llama_mm built with its CUDA kernels")


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_qlinear_cuda_matches_reference(bits, asymmetric, dtype):
    for K, group_size in ((256, 128), (96, 32), (256, 256), (72, 24)):
        packed, scale, zero, _ = quantized(70, K, bits, group_size, asymmetric, scale_dtype=dtype, seed=K,
                                           device="cuda")
        for M in (1, 3, 8, 64, 65, 130):
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).cuda()
            assert_close(f"qlinear cuda K={K} g={group_size} M={M}",
                         torch.ops.llama_mm.qlinear(x, packed, scale, zero, bits, group_size),
                         ops.qlinear_ref(x, packed, scale, zero, bits, group_size))


@needs_cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_qlinear_cuda_batch_invariant(bits):
    packed, scale, zero, _ = quantized(300, 512, bits, 128, True, seed=11, device="cuda")
    x = torch.randn(DECODE_ROWS, 512, generator=torch.Generator().manual_seed(12)).bfloat16().cuda()
    alone = torch.cat([torch.ops.llama_mm.qlinear(x[r:r + 1], packed, scale, zero, bits, 128) for r in
                       range(DECODE_ROWS)])
    for M in (2, 5, 8, 9, 33, 64):
        for start in sorted({0, DECODE_ROWS - M}):
            y = torch.ops.llama_mm.qlinear(x[start:start + M], packed, scale, zero, bits, 128)
            assert torch.equal(y, alone[start:start + M]), f"M={M}, rows from {start}"
