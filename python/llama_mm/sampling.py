"""Sampling: the parameters, their validation, and a pure-PyTorch reference of the native sampler (cpp/sampling.cpp).

Order, as transformers applies its logits processors: repetition penalty -> (greedy: argmax) -> temperature ->
top-k -> top-p -> min-p -> softmax -> inverse-CDF draw of one uniform number per row from a seeded CPU generator.
The native sampler draws its uniforms from the same generator stream, so both pick the same tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int = 0

    def validate(self) -> "SamplingParams":
        def bad(field, value, rule):
            raise ValueError(f"{field} must be {rule}, got {value!r}")

        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", self.temperature, ">= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 disables it)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", self.top_p, "in (0, 1]")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", self.min_p, "in [0, 1]")
        if (not isinstance(self.repetition_penalty, (int, float)) or not math.isfinite(self.repetition_penalty)
                or self.repetition_penalty <= 0):
            bad("repetition_penalty", self.repetition_penalty, "> 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            bad("seed", self.seed, "an integer in [0, 2**63)")
        if self.temperature == 0:  # temperature 0 is greedy
            return replace(self, do_sample=False, temperature=1.0)
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [B, V] float; seen [B, V] bool. A seen token's logit is multiplied by penalty if negative, else
    divided by it."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [B, V] -> probabilities [B, V] after temperature, top-k, top-p and min-p (removed tokens: 0)."""
    scores = logits.float()
    if p.temperature != 1.0:
        scores = scores / p.temperature
    V = scores.shape[-1]
    if 0 < p.top_k < V:
        kth = torch.topk(scores, p.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if p.top_p < 1.0:
        sorted_scores, idx = torch.sort(scores, dim=-1, descending=False)
        remove_sorted = sorted_scores.softmax(-1).cumsum(-1) <= (1 - p.top_p)
        remove_sorted[..., -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(remove_sorted.scatter(-1, idx, remove_sorted), -math.inf)
    if p.min_p > 0.0:
        probs = scores.softmax(-1)
        remove = probs < probs.amax(-1, keepdim=True) * p.min_p
        remove.scatter_(-1, scores.argmax(-1, keepdim=True), False)
        scores = scores.masked_fill(remove, -math.inf)
    return scores.softmax(-1)


def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: probs [B, V], uniform [B] in [0, 1) -> ids [B]."""
    cdf = probs.cumsum(-1)
    target = (uniform.float() * cdf[..., -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, seen: torch.Tensor | None, p: SamplingParams,
                generator: torch.Generator) -> torch.Tensor:
    """One step of the reference sampler: logits [B, V] -> next ids [B]."""
    logits = logits.float()
    if torch.isnan(logits).any():
        raise ValueError("the model produced NaN logits")
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if not p.do_sample:
        return logits.argmax(-1)
    return draw(sampling_probs(logits, p), torch.rand(logits.shape[0], generator=generator))
