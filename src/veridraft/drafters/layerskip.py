"""Self-speculative decoding (Draft & Verify, Zhang et al., ACL 2024, arXiv 2309.08168).

The target drafts for itself with some attention and MLP sub-layers bypassed (`Skip`), reading
the target's own verified KV cache. The draft steps write their keys/values (for the layers that
run) into the same cache past the verified length; `propose` moves `cache.length` back to where
it found it, and the verification forward overwrites those positions.

Adaptive draft-exiting, the paper's Algorithm 2 (and its code's `auto_parameters`): drafting stops
after a token whose draft probability (softmax of the raw draft logits) is below gamma, or after
`num_tokens` (K = 12) steps. After each verification, with AR_e = accepted / drafted:

    AR <- beta1 * AR + (1 - beta1) * AR_e
    gamma~ = gamma + eps            if AR < alpha
           = gamma                  elif drafted == K
           = gamma - eps            otherwise
    gamma <- beta2 * gamma + (1 - beta2) * gamma~

with gamma0 = 0.6, eps = 0.01, alpha = 0.90, beta1 = 0.5, beta2 = 0.9. AR starts at 0 for each
generation (`prefill`); gamma is carried across generations by one drafter instance, as the
paper's code carries `th_stop_draft` across prompts.

Sampling: with `draft_sampling=True` (default) draft tokens are sampled from `probs()` of the
skip-model's logits under the generation's sampling settings, and that q is returned; with
`draft_sampling=False` (or greedy decoding) tokens are the skip-model's argmax, verified as
point masses.

`draft_vocab=N` scores draft tokens over the first N ids plus the ids of the context only
(drafters/draft_head.py): a cheaper draft step, same verification. The default, "auto", uses
16384 ids for vocabularies of 32768 ids or more (both catalog models), 0 (the full head) below.

`branches=N` (alias `topk`; greedy decoding only) makes a token tree: the greedy draft chain plus,
at each depth, the draft's next N - 1 most likely tokens as leaves (drafters/branches.py).
"""

from __future__ import annotations

import warnings

import torch

from ..draft import DecodeContext, Draft, DraftEnv, Round, as_round
from ..errors import VeridraftError
from ..models.base import Skip
from ..spec import Param
from .branches import branch_tree
from .draft_head import SubsetHead, draft_step, resolve_draft_vocab
from .params import as_bool, as_float, as_int, as_layers, format_layers

# Hand-picked skip sets (0-based layers), keyed by catalog name; a tuned profile (veridraft tune)
# takes precedence. Picked on greedy Spec-Bench dev prompts (6 groups x 1, 48 new tokens; tau and
# alpha are exact, the draft cost is counted in weights read): on these small models acceptance
# collapses as soon as more than a few sub-layers are bypassed, so light sets win.
#   smollm2-135m: attn+mlp of 14-15: alpha 0.84, tau 2.54 (with the default draft_vocab);
#     skipping attn 10-25 + mlp 12-23 gave alpha 0.05, 6 middle layers 0.60, 4 alternate 0.71.
#   gemma3-270m: attn+mlp of 8-9: alpha 0.75, tau 2.47; its head is 62% of the weights, so the
#     subset draft head (draft_vocab) is what makes its drafts cheap.
DEFAULT_SKIPS: dict[str, Skip] = {
    "smollm2-135m": Skip(attn=frozenset({14, 15}), mlp=frozenset({14, 15})),
    "gemma3-270m": Skip(attn=frozenset({8, 9}), mlp=frozenset({8, 9})),
}


def heuristic_skip(n_layers: int) -> Skip:
    """For models without a measured set: bypass attention and MLP of every other layer in the
    middle half (layers L/4 .. 3L/4), about a quarter of the network. A starting point only."""
    mid = range(n_layers // 4, (3 * n_layers) // 4, 2)
    return Skip(attn=frozenset(mid), mlp=frozenset(mid))


def net_of(model):
    return getattr(model, "net", model)


class LayerSkipDrafter:
    """Draft with the target itself, some sub-layers skipped, on the target's own KV cache."""

    name = "layerskip"
    takes_arg = False
    description = "self-speculation: the target drafts with some of its sub-layers skipped"
    params = {
        "attn": Param(str, None, "layers whose attention is skipped, e.g. 8-20 (0-based)"),
        "mlp": Param(str, None, "layers whose MLP is skipped"),
        "skip": Param(str, None, "layers skipped whole (attention and MLP)"),
        "exit": Param(int, None, "early exit: skip every layer from this one on"),
        "num_tokens": Param(int, 12, "most draft tokens per round"),
        "gamma": Param(float, 0.6, "stop drafting below this draft probability"),
        "adaptive": Param(bool, True, "adapt gamma to the acceptance rate"),
        "draft_sampling": Param(bool, True, "sample the draft when the target samples"),
        "alpha": Param(float, 0.90, "target acceptance rate of the adaptive stop"),
        "epsilon": Param(float, 0.01, "step of the adaptive stop"),
        "beta1": Param(float, 0.5, "smoothing of the acceptance rate"),
        "beta2": Param(float, 0.9, "smoothing of the stop threshold"),
        "draft_vocab": Param(str, "auto", "draft head rows: a count, 0 for all, or auto"),
        "profile": Param(str, None, "a tuned profile's path, or none (default: the model's)"),
        "branches": Param(int, 1, "> 1: a token tree with that many choices per step"),
    }
    aliases = {
        "topk": "branches",
        "k": "num_tokens",
        "max_step_draft": "num_tokens",
        "th_stop_draft": "gamma",
        "attn_skip": "attn",
        "mlp_skip": "mlp",
        "skip_attn": "attn",
        "skip_mlp": "mlp",
        "eps": "epsilon",
    }

    def __init__(
        self,
        skip: Skip,
        *,
        num_tokens: int = 12,
        gamma: float = 0.6,
        adaptive: bool = True,
        draft_sampling: bool = True,
        alpha: float = 0.90,
        epsilon: float = 0.01,
        beta1: float = 0.5,
        beta2: float = 0.9,
        draft_vocab: int | str = "auto",
        note: str | None = None,
        branches: int = 1,
    ) -> None:
        m = "layerskip"
        self.skip = skip
        self.num_tokens = as_int(m, "num_tokens", num_tokens, lo=1)
        self.gamma = as_float(m, "gamma", gamma, lo=0.0, hi=1.0)
        self.adaptive = as_bool(m, "adaptive", adaptive)
        self.draft_sampling = as_bool(m, "draft_sampling", draft_sampling)
        self.alpha = as_float(m, "alpha", alpha, lo=0.0, hi=1.0)
        self.epsilon = as_float(m, "epsilon", epsilon, lo=0.0, hi=1.0)
        self.beta1 = as_float(m, "beta1", beta1, lo=0.0, hi=1.0)
        self.beta2 = as_float(m, "beta2", beta2, lo=0.0, hi=1.0)
        # "auto" or a count; resolved against the target network at prefill
        is_auto = isinstance(draft_vocab, str) and draft_vocab.strip().lower() == "auto"
        self.draft_vocab = "auto" if is_auto else as_int(m, "draft_vocab", draft_vocab, lo=0)
        self._head: SubsetHead | None = None
        self._head_net = None
        self.note = note
        # > 1: a token tree, the draft's next branches - 1 choices as leaves (drafters/branches.py)
        self.branches = as_int(m, "branches", branches, lo=1, hi=16)
        self.cost = None  # the cost model (CostModel) cuts a branched tree when set
        self.expected_slowdown: str | None = None  # why plain decoding may be faster here
        self.ar = 0.0  # smoothed acceptance rate (the paper's "matchness")
        self._drafted = 0

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> LayerSkipDrafter:
        net = net_of(model)
        n_layers = net.config.n_layers
        name = getattr(model, "name", None)
        p = dict(params)
        explicit = {k: p.pop(k) for k in ("attn", "mlp", "skip", "exit") if k in p}
        note = None
        prof = None
        spec = p.pop("profile", None)
        if not explicit and env is not None and env.profile is not None:
            # a tuned profile (veridraft.profiles); profile=none / profile=PATH
            prof = env.profile(model, spec)
        elif not explicit and spec is not None and str(spec).strip().lower() != "none":
            raise VeridraftError(
                f"layerskip: profile={spec} given, but no profile store was passed (DraftEnv."
                "profile); use veridraft.generate/generate_ids, or pass attn=/mlp= instead"
            )
        if prof is not None:
            skip = prof.skip
            for k, v in prof.drafter_params().items():
                p.setdefault(k, v)
            note = prof.describe()
        elif explicit:
            attn: set[int] = set()
            mlp: set[int] = set()
            if "skip" in explicit:
                both = as_layers("layerskip", "skip", explicit["skip"], n_layers)
                attn |= both
                mlp |= both
            if "exit" in explicit:
                e = as_int("layerskip", "exit", explicit["exit"], lo=1, hi=n_layers)
                attn |= set(range(e, n_layers))
                mlp |= set(range(e, n_layers))
            if "attn" in explicit:
                attn |= as_layers("layerskip", "attn", explicit["attn"], n_layers)
            if "mlp" in explicit:
                mlp |= as_layers("layerskip", "mlp", explicit["mlp"], n_layers)
            skip = Skip(attn=frozenset(attn), mlp=frozenset(mlp))
        elif name in DEFAULT_SKIPS:
            skip = DEFAULT_SKIPS[name]
        else:
            skip = heuristic_skip(n_layers)
            note = (
                f"layerskip: no measured skip set for {name or 'this model'}; using every other "
                f"middle layer ({describe(skip)}), pass attn=/mlp= to choose one"
            )
            warnings.warn(note, stacklevel=3)
        if any(i >= n_layers for i in skip.attn | skip.mlp):
            raise VeridraftError(
                f"layerskip: skip set {describe(skip)} names layers beyond the model's {n_layers}"
            )
        if len(skip.attn) == n_layers and len(skip.mlp) == n_layers:
            raise VeridraftError("layerskip: the skip set bypasses every layer; keep some")
        d = cls(skip, note=note, **p)
        if d.branches > 1 and env is not None and env.cost is not None:
            d.cost = env.cost(model)
        speedup = prof.figures.get("speedup") if prof is not None else None
        if isinstance(speedup, int | float) and speedup < 1.0:
            where = f" ({prof.path.name})" if prof.path is not None else ""
            d.expected_slowdown = (
                f"layerskip: the tuned profile for {prof.model} [{prof.precision}]{where} measured "
                f"x{speedup:.2f} against plain decoding where it was tuned; plain decoding (no "
                "draft) or draft='ngram' is likely faster"
            )
        return d

    @property
    def cost_key(self) -> str:
        """The cost model's draft-step figure for exactly this drafter (skip set, draft head)."""
        return f"layerskip:{describe(self.skip)}:draft_vocab={self.draft_vocab}"

    def __repr__(self) -> str:
        return (
            f"LayerSkipDrafter({describe(self.skip)}, num_tokens={self.num_tokens}, "
            f"gamma={self.gamma:.3f}, adaptive={self.adaptive})"
        )

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        self.ar = 0.0  # per generation, as in the paper's code; gamma carries over
        self._drafted = 0
        head = self._head_for(ctx.target)
        if head is not None:
            head.reset()
            head.observe(ctx.ids)

    def _head_for(self, net) -> SubsetHead | None:
        if self._head_net is not net:
            n = resolve_draft_vocab("layerskip", self.draft_vocab, net)
            self._head = SubsetHead(net, n) if n else None
            self._head_net = net
        return self._head

    @torch.inference_mode()
    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        k = min(self.num_tokens, max_tokens)
        self._drafted = 0
        if k <= 0:
            return Draft(tokens=[])
        net, cache = ctx.target, ctx.cache
        start = cache.length
        sampled = self.draft_sampling and not ctx.sampling.greedy
        head = self._head_for(net)
        if head is not None:
            head.observe(ctx.ids)
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        confs: list[float] = []
        alts: list[list[tuple[int, float]]] = []
        branched = self.branches > 1 and not sampled
        x = ctx.ids[-1]
        try:
            for _ in range(k):
                alts.append([])
                x, conf, q = draft_step(
                    net,
                    [x],
                    cache,
                    skip=self.skip,
                    head=head,
                    sampling=ctx.sampling,
                    sampled=sampled,
                    generator=ctx.generator,
                    alts=self.branches - 1 if branched else 0,
                    alt_out=alts[-1],
                )
                tokens.append(x)
                confs.append(conf)
                if q is not None:
                    qs.append(q)
                # draft confidence: softmax of the raw draft logits at the drafted token
                if conf < self.gamma:
                    break
        finally:
            cache.truncate(start)
        self._drafted = len(tokens)
        if branched:
            return branch_tree(tokens, confs, alts, max_tokens, self.cost, len(ctx.ids))
        return Draft(tokens=tokens, q=torch.stack(qs) if sampled else None)

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        n_accepted = as_round(rnd, next_token).n_accepted
        drafted, self._drafted = self._drafted, 0
        if not self.adaptive or drafted == 0:
            return
        self.ar = self.beta1 * self.ar + (1 - self.beta1) * (n_accepted / drafted)
        if self.ar < self.alpha:
            target = self.gamma + self.epsilon
        elif drafted == self.num_tokens:
            target = self.gamma
        else:
            target = self.gamma - self.epsilon
        self.gamma = self.beta2 * self.gamma + (1 - self.beta2) * target


def describe(skip: Skip) -> str:
    return f"attn={format_layers(skip.attn)};mlp={format_layers(skip.mlp)}"
