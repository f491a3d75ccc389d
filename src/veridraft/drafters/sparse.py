"""Sparse-cache drafting: the draft reads a subset of the context, verification reads all of it.

MagicDec, TriForce, Sparse-to-Dense and SpecVLM are one scheme: the draft is the target itself
(or a smaller same-vocabulary model) attending to a few of the cached positions - sinks and a
recent window, top positions by attention, retrieved chunks - while the target verifies with its
full cache, so the output stays exactly the target's. The rules differ in what they select and
when; each is one file (streaming.py, snapkv.py, retrieval.py, topk.py, pruned.py) that
subclasses `SparseDrafter` and implements `select` (and `refresh` when it re-selects).

The draft context is a view of a cache (`view=` of the forward, per layer and optionally per KV
head), never a second full cache:
- self-speculation (no argument, `streaming`): the target reads a view of its own cache; the
  draft writes its tokens' keys/values past the committed length and `propose` moves the length
  back, as layerskip does;
- a draft model (`streaming:qwen2.5-coder-0.5b`, SpecVLM's setting): the draft model keeps its
  own cache and reads a view of it.

A selection covers the cached positions below `upto`; the draft also reads every position from
`upto` on (the tokens generated since, and its own draft tokens). Only global-attention layers
get a view: sliding-window layers already read a short window.

Spec grammar: ``METHOD[:DRAFT_MODEL][:KEY=VALUE,...]``, e.g. ``snapkv:budget=513``,
``streaming:qwen2.5-coder-0.5b:budget=1025``. The draft can also skip sub-layers, as layerskip
does: ``layerskip=true`` takes layerskip's skip set for the model (tuned profile or built-in),
``attn=``/``mlp=``/``skip=``/``exit=`` name one, e.g. ``snapkv:attn=14-15,mlp=14-15``.

Segments (veridraft.segments): positions in "system" and "question" segments are always in the
view; selection rules prune the rest.

Drafting: up to `num_tokens` tokens a round (`threshold` > 0 stops after a token whose draft
probability is lower); greedy drafts are point masses, sampled drafts return their q.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ..draft import DecodeContext, Draft, DraftEnv, Round, as_round
from ..errors import VeridraftError
from ..models.base import Capture
from ..segments import KEEP
from ..spec import Param
from .draft_head import SubsetHead, draft_step, resolve_draft_vocab
from .params import as_bool, as_float, as_int

_SKIP_KEYS = ("layerskip", "attn", "mlp", "skip", "exit", "profile")
COMMON_PARAMS = {
    "budget": Param(int, None, "cached positions the draft reads (by method)"),
    "num_tokens": Param(int, None, "draft tokens per round (by method)"),
    "threshold": Param(float, 0.0, "stop drafting below this draft confidence"),
    "draft_sampling": Param(bool, True, "sample the draft when the target samples"),
    "draft_vocab": Param(str, "auto", "draft head rows: a count, 0 for all, or auto"),
    "precision": Param(str, None, "a draft model's precision mode (default: the target's)"),
    "layerskip": Param(bool, None, "draft with layerskip's default skip set of the model"),
    "attn": Param(str, None, "layers whose attention the draft skips (as layerskip)"),
    "mlp": Param(str, None, "layers whose MLP the draft skips"),
    "skip": Param(str, None, "layers the draft skips whole"),
    "exit": Param(int, None, "early exit: the draft skips every layer from this one on"),
    "profile": Param(str, None, "a tuned layerskip profile's path, or none"),
}


@dataclass
class Selection:
    """Per global layer, the cached positions below `upto` the draft reads ([B] for every head or
    [n_kv_heads, B], sorted); an empty dict reads everything."""

    views: dict[int, Tensor]
    upto: int


@dataclass
class SelectContext:
    """What a selection rule sees: the network and cache the draft reads, the ids, how many
    positions are cached (`n`), the global layers, the positions segments keep whole."""

    net: object
    cache: object
    ids: list[int]
    n: int
    layers: list[int]
    keep: Tensor  # bool [n]: positions always in the view (kept segments)
    target: object  # the target network (scores for the draft come from it in `pruned`)
    target_cache: object


def net_of(model):
    return getattr(model, "net", model)


def global_layers(net) -> list[int]:
    return [i for i, w in enumerate(net.windows) if w is None]


def keep_mask(segments, n: int) -> Tensor:
    keep = torch.zeros(n, dtype=torch.bool)
    for kind, a, b in segments:
        if kind in KEEP:
            keep[a : min(b, n)] = True
    return keep


@torch.inference_mode()
def observe(net, cache, ids: list[int], n: int, rows: int, queries: bool = False) -> Capture:
    """Attention of the last `rows` cached positions' queries over positions [0, n), without
    touching the cache below n: those tokens are run again past the end (positions shifted by
    `rows`, for scoring only), reading [0, n - rows) through a view, then the length is restored.
    `attn[layer]` columns are positions 0..n-1."""
    rows = max(1, min(rows, n - 1, cache.max_len - n))
    cap = Capture(attn_rows=rows, queries=queries)
    view = torch.arange(n - rows)
    layers = global_layers(net)
    try:
        net(
            torch.tensor(ids[n - rows : n], dtype=torch.long),
            cache,
            view={i: view for i in layers},
            capture=cap,
            num_logits=0,
        )
    finally:
        cache.truncate(n)
    return cap


def gqa_sum(attn: Tensor, n_kv: int) -> Tensor:
    """[n_heads, L] -> [n_kv_heads, L]: a KV head's score is its query group's sum."""
    return attn.view(n_kv, -1, attn.shape[-1]).sum(1)


def top_positions(scores: Tensor, n: int, forced: Tensor) -> Tensor:
    """Per row of scores [H, L], the `forced` positions (bool [L]) and the n best others, sorted:
    [H, n + forced.sum()] (the same count for every row)."""
    n = max(0, min(n, int((~forced).sum())))
    s = scores.masked_fill(forced, float("inf"))
    idx = s.topk(n + int(forced.sum()), dim=-1).indices
    return idx.sort(dim=-1).values


class SparseDrafter(ABC):
    """Draft with a sparse view of a cache: the target's own, or a draft model's."""

    name = "sparse"
    takes_arg = None  # optional: a same-vocabulary draft model
    usage = "METHOD[:DRAFT_MODEL][:budget=N,...]"
    description = "a sparse view of a cache"
    method_params: dict[str, Param] = {}
    params: dict[str, Param] = COMMON_PARAMS
    aliases = {"k": "num_tokens", "gamma": "num_tokens", "attn_skip": "attn", "mlp_skip": "mlp"}
    default_budget = 257
    default_tokens = 3
    scores_from_target = False  # rules scored by the target's attention even with a draft model

    def __init__(
        self,
        draft_net=None,
        *,
        skip=None,
        budget: int | None = None,
        num_tokens: int | None = None,
        threshold: float = 0.0,
        draft_sampling: bool = True,
        draft_vocab: int | str = "auto",
        label: str | None = None,
        target_vocab: int | None = None,
    ) -> None:
        m = self.name
        self.net = draft_net  # None: the target drafts for itself
        self.skip = skip
        b = self.default_budget if budget is None else budget
        self.budget = as_int(m, "budget", b, lo=0)  # 0: the rule's own (pruned: a fraction)
        nt = self.default_tokens if num_tokens is None else num_tokens
        self.num_tokens = as_int(m, "num_tokens", nt, lo=1)
        self.threshold = as_float(m, "threshold", threshold, lo=0.0, hi=1.0)
        self.draft_sampling = as_bool(m, "draft_sampling", draft_sampling)
        is_auto = isinstance(draft_vocab, str) and draft_vocab.strip().lower() == "auto"
        self.draft_vocab = "auto" if is_auto else as_int(m, "draft_vocab", draft_vocab, lo=0)
        self.target_vocab = target_vocab
        self.label = label or m
        self._head: SubsetHead | None = None
        self._head_net = None
        self.cache = None  # a draft model's own cache
        self.sel = Selection({}, 0)
        self._sctx: SelectContext | None = None
        self._capture: Capture | None = None  # what the last verification captured
        self.rounds = 0

    # -- building from a spec --

    @classmethod
    def from_spec(cls, model, arg: str | None, params: dict, env: DraftEnv | None = None):
        from .model import check_same_vocab, resolve_draft_in

        p = dict(params)
        env = env or DraftEnv()
        precision = p.pop("precision", None)
        skip_params = {k: p.pop(k) for k in _SKIP_KEYS if k in p}
        drafter_model = model
        draft_net = None
        label = cls.name
        if arg is not None:
            draft, dlabel = resolve_draft_in(cls.name, arg, model, precision, env)
            check_same_vocab(model, draft, dlabel)
            draft_net, drafter_model = net_of(draft), draft
            label = f"{cls.name}:{dlabel}"
        elif precision is not None:
            raise VeridraftError(
                f"{cls.name}: precision= applies to a draft model ({cls.name}:NAME:precision=...)"
            )
        skip = _skip_from(cls.name, drafter_model, skip_params, env)
        if skip is not None:
            label += ":layerskip"
        method = {k: p.pop(k) for k in list(p) if k in cls.method_params}
        return cls(
            draft_net,
            skip=skip,
            label=label,
            target_vocab=net_of(model).config.vocab_size if draft_net is not None else None,
            **p,
            **method,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label!r}, budget={self.budget})"

    # -- selection hooks (the rule files) --

    @abstractmethod
    def select(self, sc: SelectContext) -> Selection:
        """The cached positions the draft reads, chosen by the rule file."""

    def refresh(self, sc: SelectContext, start: int, capture) -> Selection | None:
        """A new selection before drafting from a cache holding `start` positions (`capture`:
        what the last verification captured, if asked), or None to keep the current one."""
        return None

    def wants_capture(self) -> Capture | None:
        """The Capture the next verification forward should fill, or None."""
        return None

    def verify_capture(self, ctx: DecodeContext) -> Capture | None:
        return self.wants_capture()

    # -- drafter protocol --

    def _head_for(self, net) -> SubsetHead | None:
        if self._head_net is not net:
            n = resolve_draft_vocab(self.name, self.draft_vocab, net)
            self._head = SubsetHead(net, n, self.target_vocab) if n else None
            self._head_net = net
        return self._head

    @torch.inference_mode()
    def prefill(self, ctx: DecodeContext) -> None:
        net = self.net or ctx.target
        n = len(ctx.ids) - 1  # the prompt: cached positions [0, n)
        if self.net is not None:
            need = len(ctx.ids) + max(ctx.max_new_tokens, 1) + self.num_tokens + 64
            if self.cache is None or self.cache.max_len < need:
                self.cache = None  # free the old one first
                self.cache = self.net.new_cache(need)
            self.cache.truncate(0)
            for a in range(0, n, 1024):  # in chunks: a long prompt's attention stays small
                chunk = torch.tensor(ctx.ids[a : min(n, a + 1024)], dtype=torch.long)
                self.net(chunk, self.cache, num_logits=0)
        cache = self.cache if self.net is not None else ctx.cache
        head = self._head_for(net)
        if head is not None:
            head.reset()
            head.observe(ctx.ids)
        self.rounds = 0
        self._capture = None
        self._sctx = SelectContext(
            net=net,
            cache=cache,
            ids=ctx.ids,
            n=n,
            layers=global_layers(net),
            keep=keep_mask(ctx.segments, n),
            target=ctx.target,
            target_cache=ctx.cache,
        )
        self.sel = self.select(self._sctx) if n > self.budget else Selection({}, n)

    def _views(self, limit: int) -> dict[int, Tensor]:
        """Per layer: the selection, then positions upto .. limit - 1 (one buffer; step i reads a
        prefix of it)."""
        tail = torch.arange(self.sel.upto, limit)
        out = {}
        made: dict[int, Tensor] = {}
        for layer, v in self.sel.views.items():
            if id(v) not in made:  # layers sharing a selection share the view tensor
                t = tail if v.dim() == 1 else tail.expand(v.shape[0], -1)
                made[id(v)] = torch.cat((v, t), -1)
            out[layer] = made[id(v)]
        return out

    @torch.inference_mode()
    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        if self._sctx is None or self._sctx.ids is not ctx.ids:
            self.prefill(ctx)
        k = min(self.num_tokens, max_tokens)
        if k <= 0:
            return Draft(tokens=[])
        own = self.net is not None
        net = self.net or ctx.target
        cache = self.cache if own else ctx.cache
        start = cache.length
        if own and (start > len(ctx.ids) or start < self.sel.upto):
            raise VeridraftError(f"{self.name}: the draft cache lost track of the context")
        feed = ctx.ids[start:] if own else [ctx.ids[-1]]
        new = self.refresh(self._sctx, start, self._capture)
        if new is not None:
            self.sel = new
        self._capture = None
        sampled = self.draft_sampling and not ctx.sampling.greedy
        head = self._head_for(net)
        if head is not None:
            head.observe(ctx.ids)
        limit = start + len(feed) + k
        full = self._views(limit)
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        try:
            for _ in range(k):
                cut = limit - cache.length  # positions not cached yet
                view = {i: v[..., : v.shape[-1] - cut] for i, v in full.items()}
                x, conf, q = draft_step(
                    net,
                    feed,
                    cache,
                    skip=self.skip,
                    head=head,
                    sampling=ctx.sampling,
                    sampled=sampled,
                    generator=ctx.generator,
                    target_vocab=self.target_vocab,
                    view=view or None,
                )
                tokens.append(x)
                if q is not None:
                    qs.append(q)
                feed = [x]
                if conf < self.threshold:
                    break
        finally:
            # self: leave the target's cache as found; a draft model keeps the committed ids
            cache.truncate(len(ctx.ids) if own else start)
        self.rounds += 1
        return Draft(tokens=tokens, q=torch.stack(qs) if sampled else None)

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        r = as_round(rnd, next_token)
        self._capture = r.capture


def _skip_from(method: str, model, params: dict, env: DraftEnv):
    """The skip set from layerskip's parameters (layerskip=true: its default for the model)."""
    if not params:
        return None
    p = dict(params)
    use = p.pop("layerskip", None)
    if use is not None and not as_bool(method, "layerskip", use):
        if p:
            raise VeridraftError(
                f"{method}: layerskip=false contradicts {', '.join(p)}; drop one of them"
            )
        return None
    from .layerskip import LayerSkipDrafter

    return LayerSkipDrafter.from_spec(model, None, p, env).skip
