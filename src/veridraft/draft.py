"""The drafter contract: what the decode loop gives a drafter and what it takes back.

A round: the loop calls `propose(ctx, max_tokens)`, verifies `[last] + draft.tokens` with one
target forward, then calls `update(round)` with a `Round` (accepted count, committed ids, the
measured draft and verification times, and the target's scores when the drafter sets
`wants_scores = True`). A drafter that samples its tokens must return the distribution it sampled
from as `q` (after `sampling.probs`); a drafter that picks deterministically returns `q=None` and
is verified as a point mass. That rule keeps sampling lossless.

A draft may be a token tree (`Draft.parents`, see tree.py): the loop runs every node in one
forward, each seeing only its ancestors, keeps the longest accepted root-to-node path and
compacts its cache rows; `Round.n_accepted` is that path's length. A chain is the one-branch
case and runs as before.

A drafter may define `verify_capture(ctx) -> Capture | None`: the loop passes what it returns
to the verification forward (`capture=`) and hands it back filled in `Round.capture`;
sparse-cache drafters read the target's attention of the verification rows that way. Token-tree
forwards take a capture of hidden states only (`Capture.hidden_layers`; attention stays
chain-only); captured rows follow the forward's rows (the root, then the nodes in draft order;
`Round.path` says which nodes were kept). A drafter may also define `prompt_capture() ->
Capture | None`: the prompt's forwards fill it (chunks concatenated) and the drafter finds it in
`DecodeContext.prompt_capture` at `prefill` (None when the prompt was prefilled earlier). A
trained head (drafters/eagle.py) reads the target's hidden states that way, never running a
forward of its own.

A drafter may write into the target's cache past its committed length (self-speculation does),
but must leave it as it found it: same length, nothing written below the committed length. The
loop checks both after every `propose` (KVCache keeps a low-water mark of writes, O(1)).

Drafters that need more than the target (a draft model, a tuned profile, a cost estimate) get it
through a `DraftEnv` that the API layer builds: drafters never import the loader or the stores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    import torch

    from .cache import KVCache
    from .sampling import SamplingParams


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
    # marked parts of the prompt, (kind, start, end) over ids[start:end]: kinds such as
    # "system", "document", "question" (see veridraft.segments); selection rules may keep some
    # kinds whole and prune others
    segments: list[tuple[str, int, int]] = field(default_factory=list)
    # what the prompt's forwards captured for the drafter's `prompt_capture()` (None: not asked,
    # or the prompt was prefilled before the drafter was known)
    prompt_capture: Any = None


@dataclass
class Draft:
    tokens: list[int]
    q: torch.Tensor | None = None  # [len(tokens), V] probabilities the tokens were sampled from
    # A token tree instead of a chain: parents[i] is the index in `tokens` of node i's parent,
    # -1 for a child of the last committed token; parents come before their children. None is a
    # chain (node i's parent is i - 1). Siblings are tried in index order; sampled siblings must
    # be independent draws from their q rows (see verify.verify_tree).
    parents: list[int] | None = None

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass
class Round:
    """What verification decided, for `Drafter.update` (HF's `update_candidate_strategy` gets
    the ids, the scores and the number of matches; this adds the times)."""

    n_accepted: int  # draft tokens kept
    next_token: int  # the token the target emitted after them (correction or bonus)
    drafted: int = 0  # draft tokens proposed this round
    ids: list[int] = field(default_factory=list)  # every committed id so far, next_token last
    draft_s: float | None = None  # seconds spent in `propose`
    verify_s: float | None = None  # seconds of the verification forward and acceptance
    # [drafted + 1, V] target logits of the verification rows (for a tree: the root, then the
    # nodes in draft order; `committed` tells which path was kept); only for drafters that set
    # `wants_scores = True` (keeping them costs a copy of V floats per row)
    scores: torch.Tensor | None = None
    # what the verification forward captured for a drafter whose `verify_capture(ctx)` returned
    # a models.base.Capture (e.g. attention of the verification rows over the context)
    capture: Any = None
    # the accepted draft nodes, root to leaf (indices into the draft's tokens; 0..n-1 for a chain)
    path: list[int] = field(default_factory=list)

    @property
    def committed(self) -> list[int]:
        """The ids this round added: the accepted draft tokens and next_token."""
        return self.ids[len(self.ids) - self.n_accepted - 1 :]


def as_round(rnd: Round | int, next_token: int | None = None) -> Round:
    """A Round from `update`'s argument; built-in drafters also accept the older
    `update(n_accepted, next_token)` call (no times, no ids)."""
    if isinstance(rnd, Round):
        return rnd
    return Round(n_accepted=int(rnd), next_token=-1 if next_token is None else int(next_token))


@runtime_checkable
class Drafter(Protocol):
    name: str

    def prefill(self, ctx: DecodeContext) -> None: ...

    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft: ...

    def update(self, rnd: Round) -> None: ...


def _never(name: str) -> bool:
    return False


@dataclass
class DraftEnv:
    """Resources a drafter may need beyond the target, injected by the API layer.

    load(name, precision) -> a loaded model (with .net and .tokenizer); knows(name) says whether
    `name` is a catalog model or a path `load` accepts; profile(model, spec) -> the tuned
    layerskip profile (spec None: the default lookup; "none": no profile; else a path) or None;
    cost(model) -> the model's cost model on this machine (veridraft.costmodel) or None;
    datastore(name, model) -> the retrieval datastore `name` checked against the model's
    tokenizer (veridraft.datastore).
    """

    load: Callable[[str, str | None], Any] | None = None
    knows: Callable[[str], bool] = _never
    profile: Callable[[Any, str | None], Any] | None = None
    cost: Callable[[Any], Any] | None = None
    datastore: Callable[[str, Any], Any] | None = None


_default_env: Callable[[Any], DraftEnv] | None = None


def set_default_env(factory: Callable[[Any], DraftEnv] | None) -> None:
    """Install the function that builds a DraftEnv for a target when none is passed (the
    package installs one that reaches the loader and the stores)."""
    global _default_env
    _default_env = factory


def default_env(model) -> DraftEnv:
    """The DraftEnv for `model` from the installed factory; an empty one without a factory."""
    return _default_env(model) if _default_env is not None else DraftEnv()
