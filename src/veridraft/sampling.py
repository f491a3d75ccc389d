"""Sampling settings and the one logits -> probabilities transform that every part shares.

The target's p and a drafter's q must go through the same `probs()` so that speculative
sampling stays exactly lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import VeridraftError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise VeridraftError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise VeridraftError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise VeridraftError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Rows of logits [..., V] -> probabilities after temperature, top-k and top-p (float32).

    Greedy settings give a one-hot distribution on the argmax.
    """
    logits = logits.float()
    if params.greedy:
        out = torch.zeros_like(logits)
        out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return out
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_p = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token is always kept).
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(-1)


def sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a probability row [V]."""
    return int(torch.multinomial(p, 1, generator=generator).item())
