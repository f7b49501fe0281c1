"""torch.ops.llama_mm.paged_attention: single-query attention over a paged KV cache, against a pure-torch float64
reference over random block tables (GQA, every float dtype), row independence, opcheck, and bad arguments."""
import pytest
import torch

from llama_mm import _C, ops  # noqa: F401  (loading _C registers the ops)
from references import attention_ref


def paged_case(B=5, H=8, Hkv=2, D=64, bs=16, num_blocks=40, max_blocks=6, dtype=torch.float32, device="cpu",
               seed=0, index_dtype=torch.int32):
    """Random pools, a random block table per row (distinct blocks, shuffled) and random lengths."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k_pool = torch.randn(num_blocks, Hkv, bs, D, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, Hkv, bs, D, generator=g).to(dtype)
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(B)]).to(index_dtype)
    lengths = torch.randint(1, max_blocks * bs + 1, (B,), generator=g)
    lengths[0] = max_blocks * bs  # a full table
    lengths[-1] = 1  # a single key
    return [t.to(device) for t in (q, k_pool, v_pool, tables, lengths)]


def dense_ref(q, k_pool, v_pool, tables, lengths):
    """The reference through the contiguous-cache formula: each row's keys gathered, padding masked out."""
    B, _, D = q.shape
    bs = k_pool.shape[2]
    out = []
    for b in range(B):
        n = int(lengths[b])
        blocks = tables[b, : (n + bs - 1) // bs].long().cpu()

        def rows(pool):  # (1, Hkv, n, D)
            p = pool.cpu()[blocks]
            return p.permute(1, 0, 2, 3).reshape(1, p.shape[1], -1, D)[:, :, :n]

        out.append(attention_ref(q[b:b + 1].cpu(), rows(k_pool), rows(v_pool), torch.zeros(1, n)))
    return torch.cat(out)  # (B, H, D) float64


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [dict(H=8, Hkv=2, D=64, bs=16), dict(H=6, Hkv=3, D=40, bs=5),
                                   dict(H=4, Hkv=4, D=128, bs=32, max_blocks=3)])
def test_matches_reference(dtype, tol, shape):
    args = paged_case(dtype=dtype, **shape)
    out = torch.ops.llama_mm.paged_attention(*args)
    expected = dense_ref(*args)
    err = (out.double() - expected).abs().max().item()
    print(f"{dtype} {shape}: max |error| {err:.2e}")
    assert out.shape == args[0].shape and out.dtype == dtype
    assert err <= tol
    # the Python reference agrees with the float64 one (it is what the op's fallback runs)
    assert (ops.paged_attention_ref(*args).double() - expected).abs().max().item() <= tol


def test_int64_tables_and_lengths():
    q, k, v, tables, lengths = paged_case(index_dtype=torch.int64)
    out = torch.ops.llama_mm.paged_attention(q, k, v, tables, lengths)
    torch.testing.assert_close(out, torch.ops.llama_mm.paged_attention(q, k, v, tables.int(), lengths.int()),
                               rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_independent_of_the_batch(dtype):
    """Batch invariance: a row's output is bit-identical whether computed alone or among other rows."""
    q, k, v, tables, lengths = paged_case(B=7, dtype=dtype, seed=3)
    together = torch.ops.llama_mm.paged_attention(q, k, v, tables, lengths)
    for b in range(q.shape[0]):
        alone = torch.ops.llama_mm.paged_attention(q[b:b + 1], k, v, tables[b:b + 1], lengths[b:b + 1])
        assert torch.equal(alone[0], together[b]), f"row {b}"


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.llama_mm.paged_attention, paged_case(B=3, dtype=dtype, num_blocks=12))


def test_bad_arguments():
    q, k, v, tables, lengths = paged_case(B=2, num_blocks=12, max_blocks=3)
    op = torch.ops.llama_mm.paged_attention
    with pytest.raises(RuntimeError, match=r"lengths\[1\] = 49 outside \[1, max_blocks \* block_size = 48\]"):
        op(q, k, v, tables, torch.tensor([3, 49]))
    with pytest.raises(RuntimeError, match=r"lengths\[0\] = 0 outside"):
        op(q, k, v, tables, torch.tensor([0, 3]))
    bad = tables.clone()
    bad[1, 0] = 12
    with pytest.raises(RuntimeError, match=r"block_tables\[1, 0\] = 12 outside the pool's 12 blocks"):
        op(q, k, v, bad, lengths)
    with pytest.raises(RuntimeError, match="block_tables must be int32 or int64, got Float"):
        op(q, k, v, tables.float(), lengths)
    with pytest.raises(RuntimeError, match=r"block_tables must be \[B, max_blocks\] with B = 2"):
        op(q, k, v, tables[:1], lengths)
    with pytest.raises(RuntimeError, match=r"lengths must be \[B\] = \[2\]"):
        op(q, k, v, tables, lengths[:1])
    with pytest.raises(RuntimeError, match="query heads 8 not a multiple of kv heads 3"):
        op(q, torch.randn(12, 3, 16, 64), torch.randn(12, 3, 16, 64), tables, lengths)
    with pytest.raises(RuntimeError, match="head_dim of k_pool"):
        op(q, k[..., :32], v[..., :32], tables, lengths)
    with pytest.raises(RuntimeError, match="k_pool must have the dtype of q"):
        op(q, k.bfloat16(), v, tables, lengths)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        op(q.double(), k.double(), v.double(), tables, lengths)


@pytest.mark.skipif(not torch.cuda.is_available() or not ops.CUDA_KERNELS, reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [dict(H=8, Hkv=2, D=64, bs=16), dict(H=6, Hkv=3, D=40, bs=5),
                                   dict(H=32, Hkv=8, D=128, bs=16, max_blocks=40, num_blocks=300)])
def test_cuda_matches_reference(dtype, tol, shape):
    args = paged_case(dtype=dtype, device="cuda", **shape)
    out = torch.ops.llama_mm.paged_attention(*args)
    err = (out.double().cpu() - dense_ref(*args)).abs().max().item()
    print(f"cuda {dtype} {shape}: max |error| {err:.2e}")
    assert err <= tol
    q, k, v, tables, lengths = args
    alone = torch.ops.llama_mm.paged_attention(q[1:2], k, v, tables[1:2], lengths[1:2])
    assert torch.equal(alone[0], out[1])
