"""Continuous batching (llama_mm.batching.BatchEngine over the native scheduler): a request served alone equals the
single-request engine and transformers' generate; served among others it equals itself alone (batch invariance,
fp32 and bf16, greedy and sampled); logprobs equal the PyTorch model's log-softmax; the paged KV pool admits,
queues, refuses and frees as specified; and the batch-invariant gemv kernel underneath."""
import threading

import pytest
import torch

import llama_mm
from llama_mm import _C  # noqa: F401  (the extension must be built)
from llama_mm.batching import BatchEngine, FinishEvent, QueueFull, RequestTooLarge, TokenEvent
from llama_mm.engine import Engine
from llama_mm.sampling import SamplingParams
from checkpoints import build_reference, random_inputs, write_checkpoint

GREEDY = SamplingParams()
TIMEOUT = 120


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = build_reference(attn_implementation="sdpa", seed=21)
    ck = write_checkpoint(tmp_path_factory.mktemp("ck"), ref)
    return ref, ck, llama_mm.load_model(ck)


class Collector:
    """on_event for one request: its tokens, logprob events and FinishEvent, checking the event order."""

    def __init__(self, engine=None, on_token=None):
        self.tokens, self.events, self.finish = [], [], None
        self.done = threading.Event()
        self.engine, self.on_token, self.stats_at_finish = engine, on_token, None

    def __call__(self, event):
        assert self.finish is None, "an event after the FinishEvent"
        if isinstance(event, FinishEvent):
            self.finish = event
            if self.engine is not None:
                self.stats_at_finish = self.engine.stats()
            self.done.set()
        else:
            assert isinstance(event, TokenEvent)
            self.tokens.append(event.token_id)
            self.events.append(event)
            if self.on_token:
                self.on_token(self)

    def wait(self):
        assert self.done.wait(TIMEOUT), "request did not finish"
        return self


def submit(engine, req, collector=None):
    c = collector or Collector()
    engine.submit(req["inputs"], max_new_tokens=req["n"], params=req.get("params", GREEDY),
                  stop_ids=req.get("stop", ()), logprobs=req.get("logprobs", 0), on_event=c)
    return c


def while_held(engine, blocker_inputs, queue):
    """Calls queue() while the engine thread is held (inside a one-token blocker request's callback), so what it
    submits joins at one step whatever the timing; returns what queue() returned once the blocker is done."""
    held, go = threading.Event(), threading.Event()

    def hold(c):
        held.set()
        assert go.wait(TIMEOUT)

    blocker = submit(engine, dict(inputs=blocker_inputs, n=1), Collector(on_token=hold))
    assert held.wait(TIMEOUT)
    try:
        queued = queue()
    finally:
        go.set()
    blocker.wait()
    return queued


def serve_together(engine, reqs, blocker_inputs):
    """All submitted while the engine thread is held (while_held); also returns the most requests seen running at
    one step."""
    peak = []
    collectors = while_held(engine, blocker_inputs, lambda: [
        submit(engine, r, Collector(on_token=lambda c: peak.append(engine.stats()["running"]))) for r in reqs])
    return [c.wait() for c in collectors], max(peak)


def serve_alone(engine, reqs):
    return [submit(engine, r).wait() for r in reqs]


def hf_greedy(ref, inputs, n):
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


ALONE_CASES = {
    "image": dict(seq=11, aspect_ratios=((2, 2),)),
    "text-only": dict(seq=9, with_image=False),
    "two-images": dict(seq=14, images_per_row=2, aspect_ratios=((1, 2), (3, 1))),
}


@pytest.mark.parametrize("case", list(ALONE_CASES))
def test_alone_equals_engine_and_transformers(setup, case):
    ref, _, model = setup
    inputs = random_inputs(ref, seed=len(case), **ALONE_CASES[case])
    n = 24
    engine = BatchEngine(model, prefill_chunk=4)  # several prefill chunks per prompt
    try:
        got = submit(engine, dict(inputs=inputs, n=n)).wait()
    finally:
        engine.close()
    assert got.finish.reason == "length" and got.finish.completion_tokens == n
    assert got.finish.prompt_tokens == inputs["input_ids"].shape[1]
    assert got.tokens == Engine(model).run(inputs, n)[0].tolist()
    assert got.tokens == hf_greedy(ref, inputs, n)


@pytest.fixture(scope="module")
def wide_setup(tmp_path_factory):
    """Tiles of 112 pixels: 65 image keys per tile, 260 per image (4 tile slots), so that the masked keys of an
    image with fewer tiles reach past whole blocks of 64 (the granularity of the decode key cut)."""
    ref = build_reference(vision=dict(image_size=112), attn_implementation="sdpa", seed=23)
    ck = write_checkpoint(tmp_path_factory.mktemp("wide"), ref)
    return ref, llama_mm.load_model(ck)


WIDE_CASES = {  # decode rows attend keys [0, 65) of 260; [0, 325) of 520; all 260 (no cut)
    "one-tile": dict(aspect_ratios=((1, 1),)),
    "two-images": dict(images_per_row=2, aspect_ratios=((1, 2), (1, 1))),
    "four-tiles": dict(aspect_ratios=((2, 2),)),
}


@pytest.mark.parametrize("cached", [False, True], ids=["own-kv", "cached-kv"])
@pytest.mark.parametrize("case", list(WIDE_CASES))
def test_masked_image_keys_cut_after_the_prompt(wide_setup, case, cached):
    """After the prompt, decode rows keep only the image keys up to the last one they attend (rounded up to 64):
    tokens still equal transformers' and the single-request engine's (which cuts the same way), and the cut keys'
    charge returns to the KV budget while the request decodes. With the image cache the requests read the kept keys
    of the cache's own K/V in place (strided views, no copy), which stay as they were."""
    ref, model = wide_setup
    inputs = random_inputs(ref, seq=10, seed=5, **WIDE_CASES[case])
    n = 12
    engine = BatchEngine(model, prefill_chunk=4, image_cache_mb=64 if cached else 0)
    try:
        got = submit(engine, dict(inputs=inputs, n=n), Collector(engine)).wait()
        decoding = []
        submit(engine, dict(inputs=inputs, n=4), Collector(on_token=lambda c: decoding.append(engine.stats()))).wait()
        entries = [v.clone() for _, v in engine.image_cache._entries.values()]
        again = submit(engine, dict(inputs=inputs, n=n)).wait()
        assert [torch.equal(a, v) for a, (_, v) in zip(entries, engine.image_cache._entries.values())] == \
            [True] * len(entries)
        # two images: one entry each, the request gets their concatenation (its own K/V, copied at the cut)
        assert len(entries) == (0 if not cached else 2 if case == "two-images" else 1)
    finally:
        engine.close()
    assert again.tokens == got.tokens
    assert got.tokens == hf_greedy(ref, inputs, n)
    assert got.tokens == Engine(model).run(inputs, n)[0].tolist()
    keys = {"one-tile": 128, "two-images": 384, "four-tiles": 260}[case]  # decode keys after the cut
    per_key = 2 * 2 * ref.config.text_config.num_key_value_heads * 16 * 4  # 2 cross layers, K and V, fp32
    block = block_bytes(model, 16)
    expected = 1 + -(-keys * per_key // block)  # one block of self-attention K/V (< 16 tokens) + the image charge
    assert [d["kv_blocks_used"] for d in decoding[1:3]] == [expected, expected]  # mid-answer


def mixed_requests(ref):
    """12 requests: prompt lengths 5-30, one or two images of several shapes or none, budgets 3-20, greedy and
    seeded sampling (one with a repetition penalty)."""
    shapes = [dict(aspect_ratios=((1, 1),)), dict(with_image=False), dict(aspect_ratios=((2, 2),)),
              dict(images_per_row=2, aspect_ratios=((1, 2), (2, 1))), dict(with_image=False),
              dict(aspect_ratios=((4, 1),))]
    sampled = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    reqs = []
    for i in range(12):
        params = GREEDY
        if i % 4 == 3:
            params = SamplingParams(do_sample=True, temperature=0.8, seed=100 + i)
        elif i == 6:
            params = sampled
        elif i == 9:
            params = SamplingParams(repetition_penalty=1.3)
        reqs.append(dict(inputs=random_inputs(ref, seq=5 + (i * 7) % 26, seed=50 + i, **shapes[i % len(shapes)]),
                         n=3 + (i * 5) % 18, params=params))
    return reqs


@pytest.mark.parametrize("variant", ["float32", "bfloat16", "int4-int8-activations"])
def test_batch_invariance(setup, variant):
    """Each request's tokens (greedy and sampled) among 11 others, max_batch 8 and 4-token prefill chunks (so
    prefill interleaves with decode and batches change size every step), equal its tokens served alone; also with
    int4 weights times int8 activations (qlinear_a8)."""
    ref, ck, model = setup
    if variant == "bfloat16":
        model = llama_mm.load_model(ck, dtype=torch.bfloat16)
    elif variant == "int4-int8-activations":
        model = llama_mm.load_model(ck, quantize="int4", group_size=32, activations="int8")
    reqs = mixed_requests(ref)
    engine = BatchEngine(model, max_batch=8, prefill_chunk=4)
    try:
        alone = serve_alone(engine, reqs)
        together, peak = serve_together(engine, reqs, random_inputs(ref, seq=3, with_image=False))
        stats = engine.stats()
    finally:
        engine.close()
    for i, (a, t) in enumerate(zip(alone, together)):
        assert a.finish.reason == t.finish.reason == "length"
        assert t.tokens == a.tokens, f"request {i} differs among others"
        assert len(t.tokens) == reqs[i]["n"]
    assert peak >= 4  # several requests decoded together
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["requests_finished"] == 25 and stats["tokens_generated"] == 2 * sum(r["n"] for r in reqs) + 1


def test_sampling_follows_the_seed(setup):
    """A sampled request depends on its seed: another seed gives other tokens, the same seed the same ones."""
    ref, _, model = setup
    inputs = random_inputs(ref, seq=8, seed=3)
    engine = BatchEngine(model)
    try:
        runs = [submit(engine, dict(inputs=inputs, n=20, params=SamplingParams(do_sample=True, seed=s))).wait().tokens
                for s in (1, 1, 2)]
    finally:
        engine.close()
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_ids_end_a_request(setup):
    ref, _, model = setup
    inputs = random_inputs(ref, seq=10, seed=4)
    free = hf_greedy(ref, inputs, 12)
    stop = free[4]
    engine = BatchEngine(model)
    try:
        got = submit(engine, dict(inputs=inputs, n=12, stop=[stop])).wait()
    finally:
        engine.close()
    first = free.index(stop)
    assert got.tokens == free[:first + 1] and got.finish.reason == "stop"
    assert got.finish.completion_tokens == first + 1


def test_logprobs_equal_model_log_softmax(setup):
    """Teacher-forced: the pure-PyTorch model on prompt + generated tokens; log_softmax of its logits at each
    generating position gives the chosen token's logprob and the top-k."""
    ref, _, model = setup
    inputs = random_inputs(ref, seq=9, seed=6, aspect_ratios=((1, 3),))
    k, n = 4, 6
    engine = BatchEngine(model, prefill_chunk=5)
    try:
        got = submit(engine, dict(inputs=inputs, n=n, logprobs=k,
                                  params=SamplingParams(do_sample=True, temperature=1.5, seed=3))).wait()
    finally:
        engine.close()
    T = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], torch.tensor([got.tokens[:-1]])], 1)
    xmask = inputs["cross_attention_mask"]
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids),
                cross_attention_mask=torch.cat([xmask] + [xmask[:, -1:]] * (n - 1), 1))
    with torch.no_grad():
        lp = model(**full).logits[0, T - 1:].float().log_softmax(-1)  # (n, V)
    for i, e in enumerate(got.events):
        assert e.logprob == pytest.approx(lp[i, e.token_id].item(), abs=1e-4)
        vals, top = lp[i].topk(k)
        assert [t for t, _ in e.top_logprobs] == top.tolist()
        assert [v for _, v in e.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)


# ---- the paged KV pool -----------------------------------------------------------------------------------------


def block_bytes(model, block_size):
    """One block across the self-attention layers, K and V (hand-computed from the config)."""
    t = model.cfg.text
    self_layers = t.num_hidden_layers - len(t.cross_attention_layers)
    return self_layers * 2 * t.num_key_value_heads * block_size * (t.hidden_size // t.num_attention_heads) * 4


def test_small_pool_is_shared_without_overcommit(setup):
    """A pool of 10 blocks for 8 requests that can each need 2-4 blocks (13-22 together): admission does not
    reserve whole budgets, so more of them run at once than whole reservations would allow; requests wait for
    blocks when taking one would leave an older request unable to finish; all complete with their tokens alone,
    the pool is never over-committed and ends empty."""
    ref, _, model = setup
    mb = 10 * block_bytes(model, 16) / 2**20
    reqs = [dict(inputs=random_inputs(ref, seq=10 + i, seed=80 + i, with_image=i % 2 == 0), n=18) for i in range(8)]
    engine = BatchEngine(model, kv_cache_mb=mb, max_batch=8, prefill_chunk=8)
    try:
        assert engine.stats()["kv_blocks_total"] == 10
        alone = serve_alone(engine, reqs)
        seen = []
        # all 8 queued before the engine moves on, so they compete for the pool whatever the timing
        collectors = while_held(engine, random_inputs(ref, seq=4, seed=79, with_image=False), lambda: [
            submit(engine, r, Collector(engine, on_token=lambda c: seen.append(engine.stats()))) for r in reqs])
        together = [c.wait() for c in collectors]
        final = engine.stats()
    finally:
        engine.close()
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    assert max(s["kv_blocks_used"] for s in seen) <= 10
    image_blocks = -(-20 * 2 * 2 * 2 * 16 * 4 // block_bytes(model, 16))  # 20 image keys, 2 cross layers, K and V
    needs = [-(-(10 + i + 18) // 16) + (image_blocks if i % 2 == 0 else 0) for i in range(8)]
    whole_budgets = max(k for k in range(9) if sum(needs[:k]) <= 10)  # how many whole reservations would admit
    assert max(s["running"] for s in seen) > whole_budgets
    assert final["kv_blocks_used"] == 0


def test_pool_for_one_budget_at_a_time_completes_everyone(setup):
    """Six requests that can each need 8 of the pool's 10 blocks (and run to their budget: no stop ids), queued
    together: no deadlock (an older request can always finish), each ends with its tokens alone, no block left."""
    ref, _, model = setup
    mb = 10 * block_bytes(model, 16) / 2**20
    reqs = [dict(inputs=random_inputs(ref, seq=12, seed=120 + i, with_image=False), n=112) for i in range(6)]
    engine = BatchEngine(model, kv_cache_mb=mb, max_batch=8, prefill_chunk=8)
    try:
        alone = serve_alone(engine, reqs[:2])
        seen = []
        collectors = while_held(engine, random_inputs(ref, seq=4, seed=119, with_image=False), lambda: [
            submit(engine, r, Collector(on_token=lambda c: seen.append(engine.stats()))) for r in reqs])
        together = [c.wait() for c in collectors]
        final = engine.stats()
    finally:
        engine.close()
    assert [c.tokens for c in together[:2]] == [c.tokens for c in alone]
    assert all(c.finish.reason == "length" and len(c.tokens) == 112 for c in together)
    assert max(s["waiting_for_blocks"] for s in seen) > 0  # younger requests waited for blocks, reported
    assert final["kv_blocks_used"] == 0 and final["running"] == 0 and final["waiting_for_blocks"] == 0


def test_random_load_on_a_small_pool(setup):
    """30 requests of random prompt lengths, images and budgets (up to 7 of the pool's 12 blocks each), queued
    together with 5 of them cancelled after their second token: every request ends (no deadlock), each one not
    cancelled with its tokens alone, the pool never over-committed and empty at the end."""
    ref, _, model = setup
    rng = torch.Generator().manual_seed(4)
    draw = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=rng))  # noqa: E731
    reqs = [dict(inputs=random_inputs(ref, seq=draw(3, 30), seed=200 + i, with_image=draw(0, 1) == 1),
                 n=draw(1, 60)) for i in range(30)]
    cancelled = {3, 8, 14, 21, 27}
    engine = BatchEngine(model, kv_cache_mb=12 * block_bytes(model, 16) / 2**20, max_batch=8, prefill_chunk=8)
    try:
        alone = serve_alone(engine, [r for i, r in enumerate(reqs) if i not in cancelled])
        seen, handles = [], {}

        def on_token(i):
            def f(c):
                seen.append(engine.stats())
                if i in cancelled and len(c.tokens) == 2:
                    handles[i].cancel()
            return f

        def queue():
            out = []
            for i, r in enumerate(reqs):
                c = Collector(on_token=on_token(i))
                handles[i] = engine.submit(r["inputs"], max_new_tokens=r["n"], params=GREEDY, stop_ids=[],
                                           on_event=c)
                out.append(c)
            return out

        together = [c.wait() for c in while_held(engine, random_inputs(ref, seq=4, seed=199, with_image=False),
                                                 queue)]
        final = engine.stats()
    finally:
        engine.close()
    kept = [c for i, c in enumerate(together) if i not in cancelled]
    assert [c.tokens for c in kept] == [c.tokens for c in alone]
    for i in cancelled:
        c = together[i]
        assert c.finish.reason == ("cancelled" if reqs[i]["n"] > 2 else "length"), i
    assert max(s["kv_blocks_used"] for s in seen) <= 12
    assert final["kv_blocks_used"] == 0 and final["running"] == 0 and final["waiting"] == 0


def test_request_that_can_never_fit_is_refused(setup):
    ref, _, model = setup
    engine = BatchEngine(model, kv_cache_mb=10 * block_bytes(model, 16) / 2**20)
    inputs = random_inputs(ref, seq=10, with_image=False)
    try:
        with pytest.raises(RequestTooLarge, match=r"prompt of 10 tokens \+ max_new_tokens 400 needs 26 KV blocks of "
                                                  r"16 tokens, more than the whole pool of 10 blocks"):
            engine.submit(inputs, max_new_tokens=400, params=GREEDY, stop_ids=[], on_event=Collector())
        with pytest.raises(RequestTooLarge, match=r"10 tokens \+ max_new_tokens 600 = 610 exceeds the model context "
                                                  r"of 512 positions"):
            engine.submit(inputs, max_new_tokens=600, params=GREEDY, stop_ids=[], on_event=Collector())
        assert engine.stats()["waiting"] == 0
        assert submit(engine, dict(inputs=inputs, n=5)).wait().finish.reason == "length"  # still serves
    finally:
        engine.close()


def test_cancel_frees_blocks_at_once(setup):
    """Cancelled after its third token, a request's blocks are back in the pool when its FinishEvent arrives."""
    ref, _, model = setup
    engine = BatchEngine(model)
    three = threading.Event()
    try:
        c = Collector(engine, on_token=lambda c: len(c.tokens) == 3 and three.set())
        handle = engine.submit(random_inputs(ref, seq=12, seed=9), max_new_tokens=300, params=GREEDY, stop_ids=[],
                               on_event=c)
        assert three.wait(TIMEOUT)
        assert engine.stats()["kv_blocks_used"] > 0
        handle.cancel()
        c.wait()
        handle.cancel()  # idempotent: no second event (the Collector asserts it)
        after = submit(engine, dict(inputs=random_inputs(ref, seq=6, with_image=False, seed=2), n=5)).wait()
    finally:
        engine.close()
    assert c.finish.reason == "cancelled" and 3 <= c.finish.completion_tokens < 300
    assert c.finish.completion_tokens == len(c.tokens)
    assert c.stats_at_finish["kv_blocks_used"] == 0 and c.stats_at_finish["running"] == 0
    assert after.finish.reason == "length"  # the engine goes on serving


def test_queue_full_and_close_cancels(setup):
    ref, _, model = setup
    engine = BatchEngine(model, max_batch=1, max_queue=2)
    inputs = random_inputs(ref, seq=6, with_image=False)
    running = threading.Event()
    collectors = [Collector(on_token=lambda c: running.set())] + [Collector() for _ in range(2)]
    engine.submit(inputs, max_new_tokens=400, params=GREEDY, stop_ids=[], on_event=collectors[0])
    assert running.wait(TIMEOUT)  # the first runs (max_batch 1): the next two wait
    for c in collectors[1:]:
        engine.submit(inputs, max_new_tokens=400, params=GREEDY, stop_ids=[], on_event=c)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit(inputs, max_new_tokens=400, params=GREEDY, stop_ids=[], on_event=Collector())
    engine.close(cancel_running=True)
    assert all(c.wait().finish.reason == "cancelled" for c in collectors)
    assert engine.stats()["kv_blocks_used"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        engine.submit(inputs, max_new_tokens=4, params=GREEDY, stop_ids=[], on_event=Collector())


def test_bad_requests_raise_at_submit(setup):
    ref, _, model = setup
    engine = BatchEngine(model)
    inputs = random_inputs(ref, seq=6, with_image=False)
    kw = dict(max_new_tokens=4, params=GREEDY, stop_ids=[], on_event=Collector())
    try:
        with pytest.raises(ValueError, match=r"one prompt per request"):
            engine.submit(random_inputs(ref, batch=2, seq=6, with_image=False), **kw)
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 0"):
            engine.submit(inputs, **dict(kw, max_new_tokens=0))
        with pytest.raises(ValueError, match="temperature"):
            engine.submit(inputs, **dict(kw, params=SamplingParams(temperature=-1.0)))
        with pytest.raises(ValueError, match="logprobs must be an integer >= 0"):
            engine.submit(inputs, **dict(kw, logprobs=-1))
        with pytest.raises(ValueError, match="input_ids outside the embedding table"):
            engine.submit(dict(inputs, input_ids=inputs["input_ids"] + 1000), **kw)
        with pytest.raises(ValueError, match="max_batch must be <= 64"):
            BatchEngine(model, max_batch=65)
        assert engine.stats()["waiting"] == 0
    finally:
        engine.close()


# ---- the batch-invariant gemv kernel ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("N,K", [(37, 64), (37, 100), (37, 1000), (301, 1030)])
def test_gemv_rows_do_not_depend_on_the_batch(dtype, tol, N, K):
    # one row and several take different paths (4 weight streams; from 8 rows panels of 128, 256 or 512 values by the
    # number of rows, 6 weight rows at a time): K = 1030 is whole panels, a part panel and a scalar tail for each
    # width (M = 8: 128, 13 and 33: 256 for float32, 64: 512); N = 301 several threads' tasks and a part group
    g = torch.Generator().manual_seed(K)
    x = torch.randn(64, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    full = torch.ops.llama_mm.gemv(x, w)  # (64, N)
    ref = x.double() @ w.double().T
    assert ((full.double() - ref).abs().max() / ref.abs().max()).item() <= tol
    for M in (1, 2, 3, 5, 8, 13, 33):
        assert torch.equal(torch.ops.llama_mm.gemv(x[:M], w), full[:M]), f"M={M}"
    for b in (0, 17, 63):
        assert torch.equal(torch.ops.llama_mm.gemv(x[b], w), full[b]), f"row {b} alone"
    with pytest.raises(RuntimeError, match="at most 64 rows, got 65"):
        torch.ops.llama_mm.gemv(torch.cat([x, x[:1]]), w)
