"""The native engine: greedy tokens identical to transformers' generate, agreement with the PyTorch path, the
attention kernels against pure-torch references, and bad input."""
import copy

import pytest
import torch

import llama_mm
from llama_mm import _C  # the extension must be built: CI builds it, so a missing module fails here
from llama_mm.engine import Engine, request_tensors
from checkpoints import build_reference, random_inputs, write_checkpoint
from references import attention_ref

N = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = build_reference(attn_implementation="sdpa", seed=21)
    model = llama_mm.load_model(write_checkpoint(tmp_path_factory.mktemp("ck"), ref))
    return ref, model, Engine(model)


def greedy(engine, model, inputs, n=N, stop_ids=(), pad=0):
    return engine.run(inputs, n, stop_ids=stop_ids, pad_id=pad)


def hf_greedy(ref, inputs, n=N, **kw):
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[:, inputs["input_ids"].shape[1]:]


CASES = {f"ratio-{r[0]}x{r[1]}": dict(aspect_ratios=(r,)) for r in
         [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]}
CASES.update({
    "text-only": dict(with_image=False),
    "two-images": dict(images_per_row=2, aspect_ratios=((1, 2), (2, 2))),
    "padded-batch": dict(batch=2, left_pad=(4, 0), aspect_ratios=((2, 1), (1, 1))),
})


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_identical_to_transformers(setup, case):
    ref, model, engine = setup
    inputs = random_inputs(ref, seq=12, seed=len(case), **CASES[case])
    ours, theirs = greedy(engine, model, inputs), hf_greedy(ref, inputs)
    assert ours.shape == theirs.shape == (inputs["input_ids"].shape[0], N)
    assert torch.equal(ours, theirs), f"first difference at {(ours != theirs).nonzero()[:1].tolist()}"


def test_stops_on_end_ids_like_transformers(setup):
    ref, model, engine = setup
    inputs = random_inputs(ref, batch=2, seq=10, left_pad=(2, 0), aspect_ratios=((1, 1),), seed=5)
    free = hf_greedy(ref, inputs, n=20)
    stop = [int(free[0, 3]), int(free[1, 6])]  # tokens each row produces early
    theirs = hf_greedy(ref, inputs, n=20, eos_token_id=stop)
    ours = greedy(engine, model, inputs, n=20, stop_ids=stop, pad=0)
    assert torch.equal(ours, theirs)
    assert ours.shape[1] < 20  # everyone stopped: the loop ended early


def teacher_forced(engine, inputs, steps, reference):
    """Prefill, then steps - 1 decode steps, each fed the reference's greedy token. Yields, per step, the engine's
    logits, the whole sequence so far as model inputs, and reference(those inputs) at the last position."""
    ids = inputs["input_ids"]
    logits = engine.native.start(*request_tensors(engine, inputs), steps)
    for step in range(steps):
        full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids),
                    cross_attention_mask=torch.cat([inputs["cross_attention_mask"]] +
                                                   [inputs["cross_attention_mask"][:, -1:]] * step, 1))
        with torch.no_grad():
            expected = reference(full)
        yield logits, full, expected
        nxt = expected.argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if step < steps - 1:
            logits = engine.native.step(nxt)


def test_engine_logits_match_pytorch_path(setup):
    """Prefill and each decode step against the PyTorch model run on the whole sequence."""
    ref, model, engine = setup
    inputs = random_inputs(ref, seq=9, aspect_ratios=((2, 2),), seed=8)
    for logits, _, expected in teacher_forced(engine, inputs, 4, lambda full: model(**full).logits[:, -1]):
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("seq", [9, 100])  # 100: the prompt's products take more than gemv's 64 rows
def test_bf16_engine_as_accurate_as_transformers_bf16(setup, tmp_path, seq):
    """bf16 cannot match token for token (rounding order differs), so measure both bf16 implementations against
    float32 arithmetic on the same bf16-rounded weights: ours must be about as close as transformers' own bf16."""
    ref, _, _ = setup
    engine = Engine(llama_mm.load_model(write_checkpoint(tmp_path, ref), dtype=torch.bfloat16))
    hf16 = copy.deepcopy(ref).to(torch.bfloat16)
    truth = copy.deepcopy(hf16).float()  # float32 arithmetic, bf16-rounded weights
    inputs = random_inputs(ref, seq=seq, aspect_ratios=((2, 2),), seed=8)
    errors = []
    for logits, full, exact in teacher_forced(engine, inputs, 4, lambda full: truth(**full).logits[:, -1]):
        with torch.no_grad():
            theirs = hf16(**dict(full, pixel_values=full["pixel_values"].bfloat16())).logits[:, -1].float()
        errors.append(((logits.float() - exact).abs().max().item(), (theirs - exact).abs().max().item()))
    print("max |logit error| (llama_mm bf16, transformers bf16) per step:", errors)
    ours, theirs = map(max, zip(*errors))
    assert theirs > 0 and ours <= 1.5 * theirs


def test_bad_input_then_still_works(setup):
    ref, model, engine = setup
    inputs = random_inputs(ref, seq=8, with_image=False)
    args = request_tensors(engine, inputs)
    native = engine.native
    with pytest.raises(ValueError, match="exceeds the model context of 512"):
        native.generate(*args, 600, _C.SamplingParams(), [], 0, None)
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        native.generate(*args, 0, _C.SamplingParams(), [], 0, None)
    bad = _C.SamplingParams()
    bad.do_sample, bad.top_p = True, 1.5
    with pytest.raises(ValueError, match="top_p"):
        native.generate(*args, 4, bad, [], 0, None)
    with pytest.raises(ValueError, match="input_ids outside the embedding table"):
        native.generate(args[0] + 10_000, *args[1:], 4, _C.SamplingParams(), [], 0, None)
    assert torch.equal(greedy(engine, model, inputs, n=8), hf_greedy(ref, inputs, n=8))
    # an image's K/V [cross layers, 2, B, kv heads, S, head dim], checked at the boundary
    image = random_inputs(ref, seq=8, aspect_ratios=((1, 2),), seed=3)
    ids, mask, kv, cross, rows = request_tensors(engine, image)
    for bad_kv, what in ((kv[:1], r"image_kv must be \[cross layers, 2, B, kv heads, S, head dim\] = \[2, 2, 1, "),
                         (kv.transpose(3, 5), "image_kv must be"), (kv.double(), "image_kv must be Float"),
                         (kv.transpose(4, 5).contiguous().transpose(4, 5), "image_kv must be contiguous"),
                         (kv[..., :-1, :].contiguous(), r"cross_mask must be \[B, 1, T, S\]")):
        with pytest.raises(ValueError, match=what):
            native.generate(ids, mask, bad_kv, cross, rows, 4, _C.SamplingParams(), [], 0, None)
    with pytest.raises(ValueError, match="vision_states must be"):
        native.image_kv(torch.zeros(1, 5, 7))
    assert torch.equal(greedy(engine, model, image, n=8), hf_greedy(ref, image, n=8))


def test_callback_streams_and_stops(setup):
    ref, model, engine = setup
    inputs = random_inputs(ref, seq=8, with_image=False)
    seen = []
    out = engine.run(inputs, 30, on_tokens=lambda ids: seen.append(ids.clone()) or len(seen) == 5)
    assert out.shape == (1, 5) and torch.equal(torch.stack(seen, 1), out)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run(inputs, 30, on_tokens=lambda ids: (_ for _ in ()).throw(RuntimeError("boom")))


# ---- kernels -----------------------------------------------------------------------------------------------------



@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,H,Hkv,S,D", [(1, 4, 2, 17, 64), (3, 8, 8, 5, 16), (2, 6, 1, 300, 40), (1, 32, 8, 2049, 128)])
def test_decode_attention(dtype, tol, B, H, Hkv, S, D):
    g = torch.Generator().manual_seed(S)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    kc = torch.randn(B, Hkv, S + 7, D, generator=g).to(dtype)  # a cache longer than what is used
    vc = torch.randn(B, Hkv, S + 7, D, generator=g).to(dtype)
    valid = torch.ones(B, S + 7, dtype=torch.bool)
    valid[0, : S // 3] = False  # left padding on row 0
    out = torch.ops.llama_mm.decode_attention(q, kc, vc, valid, torch.tensor([S]))
    additive = torch.zeros(B, S).masked_fill(~valid[:, :S], float("-inf"))
    expected = attention_ref(q, kc[:, :, :S], vc[:, :, :S], additive)
    err = (out.double() - expected).abs().max().item()
    print(f"decode_attention {dtype} max abs diff {err:.2e}")
    assert out.dtype == dtype and err < tol * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("B,H,Hkv,tile,D", [(2, 8, 2, 40, 32), (1, 16, 4, 1601, 64), (2, 32, 8, 1601, 128)])
def test_cross_attention(dtype, tol, B, H, Hkv, tile, D):
    # head dims 64 and 128 take the unrolled score path; 1601-token tiles leave a partial block of keys
    g = torch.Generator().manual_seed(D)
    S = 3 * tile
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    mask = torch.zeros(B, S)
    mask[0, tile:] = torch.finfo(torch.float32).min  # row 0 sees the first tile only
    out = torch.ops.llama_mm.cross_attention(q, k, v, mask)
    err = (out.double() - attention_ref(q, k, v, mask)).abs().max().item()
    print(f"cross_attention {dtype} max abs diff {err:.2e}")
    assert err < tol
    no_mask = torch.ops.llama_mm.cross_attention(q, k, v, None)
    assert (no_mask.double() - attention_ref(q, k, v, torch.zeros(B, S))).abs().max().item() < tol


@pytest.mark.parametrize("D", [64, 40])
def test_all_masked_row_attends_uniformly(D):
    """A row whose keys are all masked (finfo.min, as transformers masks) averages the values, like the reference."""
    g = torch.Generator().manual_seed(D)
    q = torch.randn(2, 8, D, generator=g)
    k, v = torch.randn(2, 2, 200, D, generator=g), torch.randn(2, 2, 200, D, generator=g)
    mask = torch.zeros(2, 200)
    mask[1] = torch.finfo(torch.float32).min
    out = torch.ops.llama_mm.cross_attention(q, k, v, mask)
    torch.testing.assert_close(out[1], v[1].mean(1).repeat_interleave(4, 0), rtol=1e-5, atol=1e-5)
    valid = torch.ones(2, 200, dtype=torch.bool)
    valid[1] = False
    out = torch.ops.llama_mm.decode_attention(q, k, v, valid, torch.tensor([200]))
    torch.testing.assert_close(out[1], v[1].mean(1).repeat_interleave(4, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], attention_ref(q, k, v, torch.zeros(2, 200))[0].float(), rtol=1e-5, atol=1e-5)


def test_attention_ops_opcheck():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    torch.library.opcheck(torch.ops.llama_mm.decode_attention.default,
                          (q, k, v, torch.ones(2, 6, dtype=torch.bool), torch.tensor([5])))
    torch.library.opcheck(torch.ops.llama_mm.cross_attention.default, (q, k, v, torch.zeros(2, 6)))


def test_attention_bad_inputs():
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    valid = torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="length 7 outside"):
        torch.ops.llama_mm.decode_attention(q, k, v, valid, torch.tensor([7]))
    with pytest.raises(RuntimeError, match="key_valid must be a bool"):
        torch.ops.llama_mm.decode_attention(q, k, v, valid.float(), torch.tensor([3]))
    with pytest.raises(RuntimeError, match="one-element int64"):
        torch.ops.llama_mm.decode_attention(q, k, v, valid, torch.tensor([3.0]))
    with pytest.raises(RuntimeError, match="not a multiple of kv heads"):
        torch.ops.llama_mm.cross_attention(torch.randn(2, 3, 8), k, v, None)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.llama_mm.cross_attention(q.double(), k, v, None)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows,N,K,row_stride", [(1, 64, 1024, 1024), (3, 37, 129, 129), (8, 1030, 16, 16),
                                                  (1, 5, 7, 7), (2, 300, 4100, 4100), (1, 1031, 100, 100),
                                                  (1, 2053, 96, 160), (4, 19, 40, 72)])
def test_gemv(dtype, tol, rows, N, K, row_stride):
    # batch 1 walks 4 parts of each thread's rows side by side: odd N leaves rows over, K not a multiple of the
    # vector width leaves a tail, row_stride > K is a column slice of a wider weight
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(rows, 1, K, generator=g).to(dtype)
    w = torch.randn(N, row_stride, generator=g).to(dtype)[:, :K]
    out = torch.ops.llama_mm.gemv(x, w)
    expected = x.double() @ w.double().T
    err = ((out.double() - expected).abs().max() / expected.abs().max()).item()
    print(f"gemv {dtype} rows={rows} {N}x{K}: max rel diff {err:.1e}")
    assert out.shape == (rows, 1, N) and out.dtype == dtype and err < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,N,K", [(100, 300, 130), (3, 17, 64), (700, 2100, 96)])  # 2100 x 96: 2 weight blocks
@pytest.mark.parametrize("with_bias", [False, True])
def test_widened_linear(dtype, rows, N, K, with_bias):
    """16-bit weights widened to float32 GEMMs (taken for > 64 rows on CPUs without 16-bit arithmetic, and by the
    vision tower): against float64, as accurate as at::linear's own 16-bit product."""
    g = torch.Generator().manual_seed(rows + N)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) * 4 if with_bias else None
    out = torch.ops.llama_mm.widened_linear(x, w, b)
    expected = x.double() @ w.double().T + (b.double() if with_bias else 0)
    ours = (out.double() - expected).abs().max().item()
    theirs = (torch.nn.functional.linear(x, w, b).double() - expected).abs().max().item()
    print(f"widened_linear {dtype} {rows}x{N}x{K} bias={with_bias}: max abs error {ours:.3g} (F.linear {theirs:.3g})")
    assert out.shape == (rows, N) and out.dtype == dtype and ours <= 1.5 * theirs + 1e-6
    assert ours <= 2 ** -7 * expected.abs().max().item()  # within the dtype's rounding of the largest output
    torch.library.opcheck(torch.ops.llama_mm.widened_linear.default, (x[:4], w, b))


def test_widened_linear_bad_inputs():
    with pytest.raises(RuntimeError, match="disagree on K"):
        torch.ops.llama_mm.widened_linear(torch.randn(2, 5).bfloat16(), torch.randn(3, 4).bfloat16())
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.llama_mm.widened_linear(torch.randn(2, 4), torch.randn(3, 4).bfloat16())
    x, w = torch.randn(2, 4).bfloat16(), torch.randn(3, 4).bfloat16()
    with pytest.raises(RuntimeError, match=r"bias must be \[N\] = \[3\]"):
        torch.ops.llama_mm.widened_linear(x, w, torch.randn(4).bfloat16())
    with pytest.raises(RuntimeError, match="bias must have the weight's dtype"):
        torch.ops.llama_mm.widened_linear(x, w, torch.randn(3))


def test_linear_wrapper_takes_widened_where_it_applies():
    """llama_mm.ops.linear (the vision tower's and projector's products): widened_linear exactly where
    _C.widened_linear_applies says so (16-bit tensors on a CPU without that arithmetic), else F.linear, and F.linear
    whenever autograd records (gradients as F.linear's)."""
    from llama_mm import ops

    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(70, 48, generator=g), torch.randn(20, 48, generator=g), torch.randn(20, generator=g)
    assert torch.equal(ops.linear(x, w, b), torch.nn.functional.linear(x, w, b))  # float32: F.linear itself
    assert not _C.widened_linear_applies(x, w)
    for dt in (torch.bfloat16, torch.float16):
        xd, wd, bd = x.to(dt), w.to(dt), b.to(dt)
        path = torch.ops.llama_mm.widened_linear(xd, wd, bd) if _C.widened_linear_applies(xd, wd) \
            else torch.nn.functional.linear(xd, wd, bd)
        assert torch.equal(ops.linear(xd, wd, bd), path)
        layer = torch.nn.Linear(48, 20).to(dt)
        assert torch.equal(ops.apply_linear(layer, xd), ops.linear(xd, layer.weight, layer.bias))
    # autograd: F.linear, the same gradients
    wg = w.bfloat16().requires_grad_()
    ops.linear(x.bfloat16(), wg).float().sum().backward()
    wf = w.bfloat16().requires_grad_()
    torch.nn.functional.linear(x.bfloat16(), wf).float().sum().backward()
    assert torch.equal(wg.grad, wf.grad)


def test_gemv_bad_inputs():
    with pytest.raises(RuntimeError, match="at most 64 rows"):  # the scheduler's largest batch
        torch.ops.llama_mm.gemv(torch.randn(65, 4), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="disagree on K"):
        torch.ops.llama_mm.gemv(torch.randn(1, 5), torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.llama_mm.gemv(torch.randn(1, 4), torch.randn(3, 4).bfloat16())
