"""The drafter contract shared by every drafter and the decode loop.

A round: the loop calls `propose(ctx, max_tokens)`, verifies `[last] + draft.tokens` with one
target forward, then calls `update(n_accepted, next_token)`. A drafter that samples its tokens
must return the distribution it sampled from as `q` (after `sampling.probs`); a drafter that picks
deterministically returns `q=None` and is verified as a point mass. That rule keeps sampling
lossless.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..cache import KVCache
from ..sampling import SamplingParams


@dataclass
class DecodeContext:
    """What a drafter may read. `ids` grows in place as tokens are accepted.

    Invariant between rounds: `cache` holds the target's keys/values for `ids[:-1]`; `ids[-1]` is
    the last emitted token, not yet run through the target.
    """

    ids: list[int]
    prompt_len: int
    target: Any  # the target network (nn.Module with the forward contract)
    cache: KVCache
    sampling: SamplingParams
    generator: torch.Generator
    tokenizer: Any = None
    max_new_tokens: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None  # [len(tokens), V] probabilities the tokens were sampled from

    def __len__(self) -> int:
        return len(self.tokens)


@runtime_checkable
class Drafter(Protocol):
    name: str

    def prefill(self, ctx: DecodeContext) -> None: ...

    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft: ...

    def update(self, n_accepted: int, next_token: int) -> None: ...
