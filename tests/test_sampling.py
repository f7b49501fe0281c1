"""The native sampler against the Python reference (sampling.py), and both against transformers' logits processors."""
import pytest
import torch

from llama_mm import _C
from llama_mm.sampling import SamplingParams, apply_repetition_penalty, sample_next, sampling_probs

V = 1000


def native(p: SamplingParams):
    sp = _C.SamplingParams()
    for field in ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        setattr(sp, field, getattr(p, field))
    return sp


def logits(B=3, seed=0):
    return torch.randn(B, V, generator=torch.Generator().manual_seed(seed)) * 3


PARAMS = [
    SamplingParams(do_sample=True),
    SamplingParams(do_sample=True, temperature=0.6, top_p=0.9),
    SamplingParams(do_sample=True, temperature=1.3, top_k=40),
    SamplingParams(do_sample=True, top_k=50, top_p=0.8, min_p=0.05),
    SamplingParams(do_sample=True, min_p=0.2),
    SamplingParams(do_sample=True, top_p=0.3, temperature=0.7),
]


def hf_probs(x, p: SamplingParams, seen_ids=None):
    from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    ids = seen_ids if seen_ids is not None else torch.zeros(x.shape[0], 0, dtype=torch.long)
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(p.temperature))
    if p.top_k:
        procs.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        procs.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        procs.append(MinPLogitsWarper(p.min_p))
    scores = x.clone()
    for proc in procs:
        scores = proc(ids, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("p", PARAMS, ids=str)
def test_probs_match_reference_and_transformers(p):
    x = logits()
    ours_native = _C.sampling_probs(x, native(p))
    ours_py = sampling_probs(x, p)
    theirs = hf_probs(x, p)
    torch.testing.assert_close(ours_native, ours_py, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_py, theirs, rtol=1e-6, atol=1e-7)
    assert torch.equal(ours_native > 0, theirs > 0)  # the same tokens survive


def test_repetition_penalty_matches_transformers():
    x = logits()
    ids = torch.randint(0, V, (3, 30), generator=torch.Generator().manual_seed(1))
    seen = torch.zeros(3, V, dtype=torch.bool).scatter(1, ids, True)
    p = SamplingParams(do_sample=True, repetition_penalty=1.3, temperature=0.8, top_k=100)
    ours = sampling_probs(apply_repetition_penalty(x, seen, 1.3), p)
    torch.testing.assert_close(ours, hf_probs(x, p, ids), rtol=1e-6, atol=1e-7)
    # native: the same tokens drawn from the same seed as the reference, penalty included
    ref_tokens = sample_next(x, seen, p, torch.Generator().manual_seed(9))[None]
    nat_tokens = _C.sample_next(x, seen, native(p), 9, 1)
    assert torch.equal(nat_tokens, ref_tokens)


@pytest.mark.parametrize("p", PARAMS, ids=str)
def test_native_draws_equal_reference_draws(p):
    x = logits(B=4, seed=3)
    g = torch.Generator().manual_seed(1234)
    ref = torch.stack([sample_next(x, None, p, g) for _ in range(50)])
    nat = _C.sample_next(x, None, native(p), 1234, 50)
    assert torch.equal(nat, ref)


def test_greedy_is_argmax_after_penalty():
    x = logits()
    seen = torch.zeros(3, V, dtype=torch.bool)
    seen[:, x[0].argmax()] = True
    p = SamplingParams(repetition_penalty=5.0)
    nat = _C.sample_next(x, seen, native(p), 0, 1)[0]
    assert torch.equal(nat, apply_repetition_penalty(x, seen, 5.0).argmax(-1))
    assert nat[0] != x[0].argmax()


def test_greedy_picks_like_torch_argmax():
    """The first index of the maximum, in rows that tie across and within blocks, end in a partial block, hold
    signed zeros or only -inf; in float32 and bfloat16."""
    n = 128256
    rows = torch.randn(8, n, generator=torch.Generator().manual_seed(3))
    rows[1, 7000] = rows[1, 90001] = rows[1, 90002] = 50.0  # ties: three blocks apart and side by side
    rows[2, -1] = 60.0  # in the last, partial block
    rows[3] = float("-inf")
    rows[4] = -1.0
    rows[4, 300], rows[4, 299] = 0.0, -0.0  # 0.0 == -0.0: the first wins
    rows[5, 17] = rows[5, 16] = 9.0  # side by side in the first block
    rows[6, :] = 2.0  # all equal
    for x in (rows, rows.bfloat16()):
        nat = _C.sample_next(x, None, native(SamplingParams()), 0, 1)[0]
        assert torch.equal(nat, x.float().argmax(-1)), (nat, x.float().argmax(-1))


@pytest.mark.parametrize("where", [5, 128250])
def test_greedy_rejects_nan_anywhere(where):
    x = torch.randn(2, 128256)
    x[1, where] = float("nan")
    with pytest.raises(ValueError, match="NaN logits"):
        _C.sample_next(x, None, native(SamplingParams()), 0, 1)


def test_top_k_never_leaves_the_top_k():
    x = logits(B=1)
    p = SamplingParams(do_sample=True, top_k=7, temperature=2.0)
    drawn = _C.sample_next(x, None, native(p), 0, 2000).flatten()
    top = set(torch.topk(x[0], 7).indices.tolist())
    assert set(drawn.tolist()) <= top and len(set(drawn.tolist())) == 7


def test_top_p_respects_the_mass():
    x = logits(B=1)
    p = SamplingParams(do_sample=True, top_p=0.5)
    probs = x[0].softmax(-1)
    sorted_p, idx = probs.sort(descending=True)
    nucleus = set(idx[: int((sorted_p.cumsum(0) < 0.5).sum()) + 1].tolist())  # smallest set with mass >= 0.5
    drawn = set(_C.sample_next(x, None, native(p), 0, 3000).flatten().tolist())
    assert drawn == nucleus


def test_empirical_frequencies_follow_the_distribution():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(do_sample=True)
    drawn = _C.sample_next(x, None, native(p), 5, 20000).flatten()
    freq = torch.bincount(drawn, minlength=4).float() / drawn.numel()
    assert (freq - x[0].softmax(-1)).abs().max() < 0.015


def test_seed_reproduces_and_differs():
    x = logits(B=2)
    p = SamplingParams(do_sample=True, temperature=1.5)
    a, b, c = (_C.sample_next(x, None, native(p), s, 20) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw,field", [
    (dict(temperature=-0.5), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(temperature=float("nan")), "temperature"), (dict(seed=-1), "seed"),
])
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(do_sample=True, **kw).validate()


def test_temperature_zero_is_greedy():
    assert SamplingParams(do_sample=True, temperature=0).validate().do_sample is False


def test_nan_logits_are_an_error():
    x = logits()
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN logits"):
        _C.sample_next(x, None, native(SamplingParams()), 0, 1)
