"""torch.ops.llama_mm.qlinear_a8: quantized weights times int8 activations (the opt-in fast CPU path).

Oracles: a hand-computed activation quantization; ops.qlinear_a8_ref (x quantized per 32 values exactly as the
kernel does, then the dequantized product in float64: the value the kernel's exact integer sums stand for); and
the float path ops.qlinear_ref, from which int8 activations may differ by at most the rounding bound
sum_k |w[n, k]| * d[block of k] / 2. Tolerance against qlinear_a8_ref: max |diff| <= 1e-5 * max |ref| in float32
(float32 sums of the block results in another order), one unit in the last place for bfloat16 / float16 outputs.
"""

import pytest
import torch

from llama_mm import ops
from test_qlinear import DECODE_ROWS, assert_close, native, quantized  # noqa: F401  (native is a fixture)

op = torch.ops.llama_mm.qlinear_a8


def test_quantize_activations_by_hand():
    x = torch.zeros(2, 64)
    # d = 31.75 / 127 = 0.25 exactly: x / d = 127, -63.5 -> -64, 0.5 -> 0, 1.5 -> 2, -2.5 -> -2 (half to even)
    x[0, :5] = torch.tensor([31.75, -15.875, 0.125, 0.375, -0.625])
    x[1, 32:34] = torch.tensor([-4.0, 1.0])  # block 0 of row 1 all zero: d = 0, xq = 0
    xq, d = ops.quantize_activations_ref(x)
    assert d.shape == (2, 2) and xq.dtype == torch.int8
    assert d[0, 0] == 0.25 and d[0, 1] == 0 and d[1, 0] == 0 and d[1, 1] == torch.tensor(4.0) / 127
    assert xq[0, :5].tolist() == [127, -64, 0, 2, -2] and not xq[0, 5:].any()
    assert xq[1, 32:34].tolist() == [-127, 32] and not xq[1, :32].any()  # 1 / (4 / 127) = 31.75 -> 32


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
# 64 / 128 / 256 (= K, the channel strategy): two blocks per step; 32, 96: one; 8, 16: the scalar loop
@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 96, 128, 256])
def test_qlinear_a8_matches_reference(native, bits, asymmetric, group_size):
    K = 384 if group_size == 96 else 256
    packed, scale, zero, _ = quantized(40, K, bits, group_size, asymmetric, seed=group_size)
    for M in (1, 3, 4, 9, 70):
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
        x[0, 32:64] = 0  # an all-zero block: d = 0
        assert_close(f"qlinear_a8 bits={bits} g={group_size} M={M}", op(x, packed, scale, zero, bits, group_size),
                     ops.qlinear_a8_ref(x, packed, scale, zero, bits, group_size))


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_within_the_rounding_bound_of_the_float_path(bits):
    """int8 activations change y by at most sum_k |w[n, k]| * d[block of k] / 2 (each xq is x / d rounded)."""
    K = 256
    packed, scale, zero, _ = quantized(24, K, bits, 64, True, seed=3)
    x = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).float()
    w = ops.qlinear_dequantize(packed, scale, zero, bits, 64, torch.float64)  # (N, K)
    _, d = ops.quantize_activations_ref(x)
    bound = (d.double().repeat_interleave(32, dim=1) / 2) @ w.abs().T  # (M, N)
    exact = x.double() @ w.T
    diff = (ops.qlinear_a8_ref(x.double(), packed, scale, zero, bits, 64) - exact).abs()
    assert (diff <= bound * 1.001).all()  # float32 x / d may land a hair past a half
    assert diff.max() > 1e-3 * exact.abs().max()  # and activations really are rounded


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_qlinear_a8_dtypes(native, x_dtype, scale_dtype):
    packed, scale, zero, _ = quantized(24, 128, 4, 64, True, scale_dtype=scale_dtype, seed=5)
    x = (torch.randn(3, 2, 128, generator=torch.Generator().manual_seed(6)) * 2).to(x_dtype)
    y = op(x, packed, scale, zero, 4, 64)
    assert y.shape == (3, 2, 24) and y.dtype == x_dtype
    assert_close("qlinear_a8", y, ops.qlinear_a8_ref(x, packed, scale, zero, 4, 64))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 128])
def test_qlinear_a8_batch_invariant(native, bits, group_size):
    """Row r of an M-row call (M <= 64) is bitwise the row computed alone, wherever it sits; past 64 rows (a long
    prefill) the op is qlinear's float32 path, bitwise."""
    packed, scale, zero, _ = quantized(67, 384, bits, group_size, True, seed=7)
    x = torch.randn(DECODE_ROWS + 6, 384, generator=torch.Generator().manual_seed(8))
    long = op(x, packed, scale, zero, bits, group_size)
    assert torch.equal(long, torch.ops.llama_mm.qlinear(x, packed, scale, zero, bits, group_size))
    x = x[:DECODE_ROWS]
    alone = torch.cat([op(x[r:r + 1], packed, scale, zero, bits, group_size) for r in range(DECODE_ROWS)])
    assert not torch.equal(alone, long[:DECODE_ROWS])  # int8 activations below the limit
    for M in (2, 3, 4, 5, 7, 9, 17, 33, 64):
        for start in sorted({0, 1, DECODE_ROWS - M}):
            assert torch.equal(op(x[start:start + M], packed, scale, zero, bits, group_size), alone[start:start + M]), \
                f"M={M}, rows from {start}"


def test_qlinear_a8_wrapper_grad_and_opcheck(native):
    packed, scale, zero, _ = quantized(16, 64, 4, 32, True, seed=9)
    x = torch.randn(3, 64)
    assert torch.equal(ops.qlinear_a8(x, packed, scale, zero, 4, 32), op(x, packed, scale, zero, 4, 32))
    xg = x.clone().requires_grad_()
    grad = torch.randn(3, 16)
    op(xg, packed, scale, zero, 4, 32).backward(grad)  # straight through the activation rounding
    w = ops.qlinear_dequantize(packed, scale, zero, 4, 32)
    assert_close("qlinear_a8 grad x", xg.grad, grad @ w)
    xg.grad = None
    ops.qlinear_a8(xg, packed, scale, zero, 4, 32).backward(grad)  # the wrapper under autograd: the reference
    assert_close("qlinear_a8_ref grad x", xg.grad, grad @ w)
    for args in ((xg, packed, scale, zero, 4, 32), (x.bfloat16(), packed, scale, None, 4, 32)):
        torch.library.opcheck(op.default, args)


def test_qlinear_a8_bad_arguments(native):
    packed, scale, zero, _ = quantized(8, 64, 4, 32, True, seed=10)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match=r"llama_mm.qlinear_a8: K = 40 must be a multiple of 32 \(activations"):
        op(torch.randn(2, 40), packed[:, :5], torch.ones(8, 5), None, 4, 8)
    with pytest.raises(RuntimeError, match=r"llama_mm.qlinear_a8: bits must be 4 or 8, got 2"):
        op(x, packed, scale, zero, 2, 32)
    with pytest.raises(RuntimeError, match=r"llama_mm.qlinear_a8: scale must have shape \[N, K / group_size\]"):
        op(x, packed, torch.ones(8, 3), zero, 4, 32)
    with pytest.raises(ValueError, match="qlinear_a8: K = 40 must be a multiple of 32"):
        ops.qlinear_a8_ref(torch.randn(2, 40), packed[:, :5], torch.ones(8, 5), None, 4, 8)
