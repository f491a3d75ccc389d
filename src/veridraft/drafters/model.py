"""A separate draft model with the target's vocabulary (classic speculative decoding).

The draft model keeps its own KV cache. Invariant: after `update`, the draft cache holds the
keys/values of a prefix of the committed ids; `propose` runs the ids it has not seen yet (the last
committed token, plus the last accepted draft token when every draft token was accepted), then
drafts one token per forward. Rejected draft positions are dropped with an O(1) `truncate`.
Its pass over the prompt runs at the first `propose` that asks for tokens, not in `prefill`: in a
batch whose planner gives a request no draft rows the draft model never runs for it.

Drafting is greedy (q = None, verified as a point mass) under greedy decoding or with
`draft_sampling=False`; otherwise tokens are sampled from `probs(draft_logits, sampling)` and
that q is returned, so speculative sampling stays exact.

Draft length, `mode`:
- "dynamic" (default): HF assisted generation's default behaviour (`num_assistant_tokens_schedule=
  "constant"` with `assistant_confidence_threshold`): draft up to `num_tokens`, stop after a
  token whose draft probability is below `threshold` (0.4 initially, HF's default; the token is
  kept, as HF's ConfidenceCriteria stops after appending). After each verification the threshold
  is re-fitted as HF does: over the history of (draft probability, accepted?) pairs - every
  accepted draft token and the first rejected one per round - pick the ROC threshold minimising
  FPR + 3 FNR (HF uses sklearn's roc_curve; this is the same minimiser computed with numpy),
  once there are more than 5 pairs of both kinds.
- "heuristic": HF's `num_assistant_tokens_schedule="heuristic"`: the draft length grows by 2 after
  a round where every draft token was accepted, else shrinks by 1 (minimum 1); no threshold.
- "fixed": always `num_tokens` tokens (the budget permitting).

The draft probability used for the threshold is HF's: softmax of the draft scores at the drafted
token - the raw logits when drafting greedily, the processed distribution q when sampling.

`draft_vocab=N` scores draft tokens over the first N ids plus the ids of the context only
(drafters/draft_head.py): a cheaper draft step, same verification. The default, "auto", uses
16384 ids for vocabularies of 32768 ids or more (both catalog models), 0 (the full head) below.

`model:NAME-lN` drafts with NAME's first N layers plus its final norm and head (sharing the
weights, no copy); with NAME the target itself this is the same-vocabulary real pair used in the
tests and benchmarks (e.g. `model:smollm2-135m-l8`).

`branches=N` (alias `topk`; greedy decoding only) makes a token tree: the greedy draft chain plus,
at each depth, the draft's next N - 1 most likely tokens as leaves (drafters/branches.py).

`precision=fp32|fp16w|bf16|q4` (default: the target's mode): a draft loaded on its own runs in
that mode; a draft that is the target or a `NAME-lN` truncation of it shares the target's weights.
It changes which tokens are proposed, never what is accepted.
"""

from __future__ import annotations

import re
import weakref

import numpy as np
import torch
from torch import nn

from ..draft import DecodeContext, Draft, DraftEnv, Round, as_round
from ..errors import VeridraftError
from ..spec import Param
from .branches import branch_tree
from .draft_head import SubsetHead, draft_step, resolve_draft_vocab
from .params import as_bool, as_choice, as_float, as_int

MODES = ("dynamic", "heuristic", "fixed")
_LAYERS_SUFFIX = re.compile(r"^(.+)-l(\d+)$")
_MAX_HISTORY = 8192
_LOADED: dict[str, object] = {}  # draft models loaded by name, reused across generate() calls


def truncate_layers(net: nn.Module, n: int) -> nn.Module:
    """A model made of net's embedding, its first n blocks, its final norm and head.

    Shares every weight with `net` (no copy); the result has its own config (n_layers = n), so
    its caches hold n layers. Works for any native Transformer (models/base.py).
    """
    cfg = net.config
    if not 1 <= n <= cfg.n_layers:
        raise VeridraftError(f"model: cannot keep {n} layers of a {cfg.n_layers}-layer model")
    import dataclasses

    small = dataclasses.replace(
        cfg,
        n_layers=n,
        layer_types=list(cfg.layer_types[:n]),
        eos_token_ids=list(cfg.eos_token_ids),
    )
    with torch.device("meta"):
        new = type(net)(small, getattr(net, "precision", "fp32"))
    new.tok_embeddings = net.tok_embeddings
    new.norm = net.norm
    new.output = net.output
    new.layers = nn.ModuleList(list(net.layers)[:n])
    for name, t in list(new.named_parameters()) + list(new.named_buffers()):
        if t.device.type == "meta":
            raise VeridraftError(
                f"model: truncate_layers does not know how to share {name!r} of "
                f"{type(net).__name__}; the architecture gained a module"
            )
    new.requires_grad_(False)
    new.eval()
    return new


def net_of(model):
    return getattr(model, "net", model)


def vocab_of(tokenizer) -> dict | None:
    backend = getattr(tokenizer, "backend", None)
    if backend is None or not hasattr(backend, "get_vocab"):
        return None
    return backend.get_vocab(with_added_tokens=True)


# Comparing two tokenizers reads both whole vocabularies into dicts (about 0.25 s for Qwen's
# 151,665 ids, holding the GIL): a server making a drafter per request would stall every other
# request that long. The answer is kept per pair of tokenizer objects.
_SAME_VOCAB: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _same_vocab(t_tok, d_tok) -> bool | None:
    """Whether two tokenizers have the same vocabulary (None: one of them cannot say)."""
    try:
        known = _SAME_VOCAB.get(t_tok)
        if known is None:
            known = _SAME_VOCAB[t_tok] = weakref.WeakKeyDictionary()
        if d_tok in known:
            return known[d_tok]
    except TypeError:  # not weakly referenceable: compare every time
        known = None
    a, b = vocab_of(t_tok), vocab_of(d_tok)
    same = None if a is None or b is None else a == b
    if known is not None:
        known[d_tok] = same
    return same


def check_same_vocab(target, draft, draft_name: str) -> None:
    """Refuse a draft model whose tokenizer differs from the target's."""
    t_net, d_net = net_of(target), net_of(draft)
    t_tok, d_tok = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    t_v, d_v = t_net.config.vocab_size, d_net.config.vocab_size
    same = None
    if t_tok is not None and d_tok is not None and t_tok is not d_tok:
        same = _same_vocab(t_tok, d_tok)
    if same is None:
        same = t_v == d_v
    if not same:
        t_name = getattr(target, "name", "the target")
        raise VeridraftError(
            f"model: draft model {draft_name!r} (vocabulary {d_v:,}) does not share the "
            f"tokenizer of {t_name!r} (vocabulary {t_v:,}); a separate draft model must use the "
            f"target's vocabulary - for different tokenizers use universal drafting "
            f"(draft='universal:{draft_name}')"
        )


def resolve_draft(name: str, target, env: DraftEnv | None = None):
    """Load the draft model named `name` for `target`: (model-like with .net, label).

    `env.knows`/`env.load` find and load models by name; NAME-lN of the target itself needs
    neither."""
    t_name = getattr(target, "name", None)
    if name == t_name:
        return target, name
    env = env or DraftEnv()
    direct = env.knows(name)
    m = _LAYERS_SUFFIX.match(name)
    if not direct and m:
        base, n = m.group(1), int(m.group(2))
        if base == t_name:
            base_model = target
        else:
            base_model = _LOADED.get(base) or _load(env, base, None)
            _LOADED[base] = base_model
        net = truncate_layers(net_of(base_model), n)
        return _Truncated(net, getattr(base_model, "tokenizer", None), name), name
    if name not in _LOADED:
        _LOADED[name] = _load(env, name, None)
    return _LOADED[name], name


def resolve_draft_in(method: str, name: str, target, precision: str | None, env: DraftEnv):
    """The draft model for `method`: `resolve_draft`, or loaded on its own in `precision`.

    Default (None): the target's mode for a draft loaded on its own (a draft in float32 reads
    2-4x the bytes of a packed target per token and can cost as much as the target); a draft
    that is the target itself or a `NAME-lN` truncation of it shares the target's weights, so
    it is used as it is. Draft precision changes which tokens are proposed, never what is
    accepted: verification is the target's alone."""
    from ..models.precision import ALL_PRECISIONS

    own = name != getattr(target, "name", None) and env.knows(name or "")
    if precision is None:
        precision = getattr(target, "precision", "fp32") if own else "fp32"
    precision = as_choice(method, "precision", precision, ALL_PRECISIONS)
    if precision == "fp32":
        return resolve_draft(name, target, env)
    if not own:
        raise VeridraftError(
            f"{method}: precision={precision} needs a draft loaded on its own (a catalog name "
            f"or a path), not {name!r}"
        )
    key = f"{name}@{precision}"
    if key not in _LOADED:
        _LOADED[key] = _load(env, name, precision)
    return _LOADED[key], f"{name}:precision={precision}"


def _load(env: DraftEnv, name: str, precision: str | None):
    if env.load is None:
        raise VeridraftError(
            f"draft model {name!r}: no model loader given; load the target with veridraft.load "
            "and pass the draft spec to generate(), or pass a Drafter instance"
        )
    return env.load(name, precision)


class _Truncated:
    def __init__(self, net, tokenizer, name) -> None:
        self.net, self.tokenizer, self.name = net, tokenizer, name


def roc_threshold(probs_hist: list[float], matches: list[int]) -> float | None:
    """The threshold minimising FPR + 3 FNR over (score, label) pairs, as HF picks it from
    sklearn's roc_curve (positive iff score >= threshold); None without both labels."""
    y = np.asarray(matches, dtype=np.int64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    s = np.asarray(probs_hist, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tps = np.cumsum(y)[last_of_value]
    fps = np.cumsum(1 - y)[last_of_value]
    cost = fps / n_neg + 3.0 * (1.0 - tps / n_pos)
    return float(s[last_of_value[int(np.argmin(cost))]])


class ModelDrafter:
    """Draft with a separate same-vocabulary model that keeps its own KV cache."""

    name = "model"
    takes_arg = True
    usage = (
        "model:NAME (a catalog name, an HF folder or GGUF path, or NAME-lN for NAME's first N "
        "layers), e.g. model:smollm2-135m-l8 or model:NAME:k=4,mode=fixed"
    )
    description = "a separate draft model with the target's vocabulary and its own KV cache"
    params = {
        "num_tokens": Param(int, None, "draft tokens per round (by mode: 16, 5 or 4)"),
        "mode": Param(str, "dynamic", "how the draft length is chosen", MODES),
        "threshold": Param(float, 0.4, "dynamic mode: stop below this draft confidence"),
        "draft_sampling": Param(bool, True, "sample the draft when the target samples"),
        "draft_vocab": Param(str, "auto", "draft head rows: a count, 0 for all, or auto"),
        "precision": Param(str, None, "the draft's precision mode (default: the target's)"),
        "branches": Param(int, 1, "> 1: a token tree with that many choices per step"),
    }
    aliases = {
        "topk": "branches",
        "k": "num_tokens",
        "num_assistant_tokens": "num_tokens",
        "assistant_confidence_threshold": "threshold",
    }

    def __init__(
        self,
        draft_net: nn.Module,
        *,
        num_tokens: int | None = None,
        mode: str = "dynamic",
        threshold: float = 0.4,
        draft_sampling: bool = True,
        draft_vocab: int | str = "auto",
        label: str = "model",
        target_vocab: int | None = None,
        branches: int = 1,
    ) -> None:
        m = "model"
        self.net = draft_net
        self.mode = as_choice(m, "mode", mode, MODES)
        if num_tokens is None:
            num_tokens = {"dynamic": 16, "heuristic": 5, "fixed": 4}[self.mode]
        self.num_tokens = as_int(m, "num_tokens", num_tokens, lo=1)
        self.threshold = as_float(m, "threshold", threshold, lo=0.0, hi=1.0)
        self.draft_sampling = as_bool(m, "draft_sampling", draft_sampling)
        self.draft_vocab = resolve_draft_vocab(m, draft_vocab, draft_net)
        self._head = (
            SubsetHead(draft_net, self.draft_vocab, target_vocab) if self.draft_vocab else None
        )
        self.name = label if label.startswith("model") else f"model:{label}"
        self.target_vocab = target_vocab
        # > 1: a token tree, the draft's next branches - 1 choices as leaves (drafters/branches.py)
        self.branches = as_int(m, "branches", branches, lo=1, hi=16)
        self.cost = None  # the cost model (CostModel) cuts a branched tree when set
        self._k = self.num_tokens  # current length (heuristic mode)
        self._hist_p: list[float] = []
        self._hist_m: list[int] = []
        self._round_conf: list[float] = []
        self._drafted: list[int] = []
        self.cache = None
        self._cached_ids: list[int] = []
        self._pending = False  # the prompt's pass is still to run (prefill defers it)

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> ModelDrafter:
        params = dict(params)
        env = env or DraftEnv()
        draft, label = resolve_draft_in("model", arg, model, params.pop("precision", None), env)
        check_same_vocab(model, draft, label)
        d = cls(
            net_of(draft),
            label=f"model:{label}",
            target_vocab=net_of(model).config.vocab_size,
            **params,
        )
        if d.branches > 1 and env.cost is not None:
            d.cost = env.cost(model)
        return d

    @property
    def cost_key(self) -> str:
        """The cost model's draft-step figure for exactly this drafter (draft model, head)."""
        return f"{self.name}:draft_vocab={self.draft_vocab}"

    def __repr__(self) -> str:
        return f"ModelDrafter({self.name!r}, mode={self.mode!r}, num_tokens={self.num_tokens})"

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        need = len(ctx.ids) + max(ctx.max_new_tokens, 1) + self.num_tokens + 2
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.net.new_cache(need)
        self.cache.truncate(0)
        self._cached_ids = []
        self._round_conf, self._drafted = [], []
        if self._head is not None:
            self._head.reset()
            self._head.observe(ctx.ids)
        # The draft model's pass over the prompt waits for the first draft (propose): a request
        # that a batch's scheduler never gives draft rows never pays it, and its first token is
        # not held back by it. It is one forward over every id before the last, whenever it runs.
        self._pending = True

    def _prompt_pass(self, ids: list[int]) -> None:
        self._pending = False
        if len(ids) > 1:
            self.net(torch.tensor(ids[:-1], dtype=torch.long), self.cache, num_logits=1)
            self._cached_ids = list(ids[:-1])

    @torch.inference_mode()
    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        if self.cache is None:
            self.prefill(ctx)
        if self.mode == "heuristic":
            k = min(self._k, max_tokens)
        else:
            k = min(self.num_tokens, max_tokens)
        self._round_conf, self._drafted = [], []
        if k <= 0:
            return Draft(tokens=[])
        if self._pending:
            self._prompt_pass(ctx.ids)
        ids = ctx.ids
        n = self.cache.length
        if n >= len(ids) or (n and self._cached_ids[n - 1] != ids[n - 1]):
            n = common_prefix(self._cached_ids, ids, min(n, len(ids) - 1))
            self.cache.truncate(n)
            del self._cached_ids[n:]
        self.cache.reserve(len(ids) - n + k)  # clear error if the cache is too small
        sampled = self.draft_sampling and not ctx.sampling.greedy
        dynamic = self.mode == "dynamic"
        if self._head is not None:
            self._head.observe(ids)
        feed = ids[n:]
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        alts: list[list[tuple[int, float]]] = []
        branched = self.branches > 1 and not sampled
        for step in range(k):
            alts.append([])
            x, conf, q = draft_step(
                self.net,
                feed,
                self.cache,
                head=self._head,
                sampling=ctx.sampling,
                sampled=sampled,
                generator=ctx.generator,
                target_vocab=self.target_vocab,
                alts=self.branches - 1 if branched else 0,
                alt_out=alts[-1],
            )
            self._cached_ids.extend(feed)
            if q is not None:
                qs.append(q)
                conf = float(q[x])  # HF: the processed distribution when sampling
            tokens.append(x)
            self._round_conf.append(conf)
            if dynamic and conf < self.threshold:
                break
            if step + 1 < k:
                feed = [x]
        self._drafted = tokens
        if branched:
            return branch_tree(tokens, self._round_conf, alts, max_tokens, self.cost, len(ids))
        return Draft(tokens=tokens, q=torch.stack(qs) if sampled else None)

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        rnd = as_round(rnd, next_token)
        n_accepted = rnd.n_accepted
        drafted = self._drafted
        if not drafted:
            return
        if self.branches > 1 and rnd.ids:
            # a tree's accepted path may leave the trunk at a leaf: count trunk matches only
            n_accepted = common_prefix(drafted, rnd.committed[:-1], n_accepted)
        # The draft cache holds ..., d1 .. d_{k-1}: keep the accepted ones.
        fed_drafts = len(drafted) - 1
        keep = self.cache.length - fed_drafts + min(n_accepted, fed_drafts)
        self.cache.truncate(keep)
        del self._cached_ids[keep:]
        if self.mode == "heuristic":
            if n_accepted == len(drafted):
                self._k = min(self._k + 2, 64)
            else:
                self._k = max(1, self._k - 1)
        elif self.mode == "dynamic":
            conf = self._round_conf
            matches = [1] * n_accepted + ([0] if n_accepted < len(conf) else [])
            self._hist_p.extend(conf[: len(matches)])
            self._hist_m.extend(matches)
            if len(self._hist_p) > _MAX_HISTORY:  # bound the per-round cost (HF keeps all)
                del self._hist_p[:-_MAX_HISTORY], self._hist_m[:-_MAX_HISTORY]
            if len(self._hist_p) > 5:
                t = roc_threshold(self._hist_p, self._hist_m)
                if t is not None:
                    self.threshold = t
        self._drafted = []


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n
