"""`hybrid`: SuffixDecoding's free drafts where they are likely to be accepted, another drafter's
elsewhere (the SuffixDecoding paper's hybrid with a model-based drafter).

    hybrid:model:qwen2.5-coder-0.5b          suffix, else the 0.5B draft model
    hybrid:streaming                         suffix, else a sinks + window self-draft
    hybrid:streaming:budget=513,min_score=2  the fallback's parameters, and the hybrid's own

Each round the suffix tries propose first. Their best tree's score, the sum of its nodes' path
probabilities (the number of its tokens expected to be accepted under the tries' counts),
decides: at or above `min_score` the suffix tree is verified, and costs no draft forward; below
it the fallback drafts. Suffix drafts pay where the text repeats itself or earlier outputs (code,
edits, quoted context, a model looping in a long continuation), a draft model or a sparse
self-draft everywhere else; each alone leaves the other's rounds to plain decoding or to a
costly draft.

The fallback reads the committed ids on its next propose, so it catches up on the tokens of
suffix rounds then (a draft model runs them in one forward); only the drafter that proposed is
told the outcome of a round. `min_score` (default 1.0) and `suffix_*` parameters (SuffixDecoding's
own, without the prefix: `suffix_max_depth=32`) belong to the hybrid; every other parameter is
the fallback's. Lossless as its parts are: suffix trees are point masses, and the fallback's
proposals (with their q when it samples) are verified as they come.
"""

from __future__ import annotations

from ..draft import DecodeContext, Draft, DraftEnv, Round, as_round
from ..errors import VeridraftError
from ..spec import Param
from .params import as_float
from .suffix import SuffixDrafter


class HybridDrafter:
    name = "hybrid"
    takes_arg = True
    usage = "hybrid:FALLBACK[:PARAMS], e.g. hybrid:model:qwen2.5-coder-0.5b or hybrid:streaming"
    description = "SuffixDecoding's trees where they score well, another drafter elsewhere"
    params = {
        "min_score": Param(float, 1.0, "suffix trees expected to keep fewer tokens go to FALLBACK")
    }
    aliases: dict[str, str] = {}
    # parameters other than its own go to the fallback drafter (checked there)
    forwards_params = True

    def __init__(self, suffix: SuffixDrafter, fallback, min_score: float = 1.0) -> None:
        self.suffix = suffix
        self.fallback = fallback
        self.min_score = as_float(self.name, "min_score", min_score, lo=0.0)
        self.name = f"hybrid:{getattr(fallback, 'name', type(fallback).__name__)}"
        self._last = None  # the drafter whose proposal is being verified
        self.suffix_rounds = 0
        self.fallback_rounds = 0

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> HybridDrafter:
        from . import make_drafter, parse_spec

        params = dict(params)
        min_score = params.pop("min_score", 1.0)
        suffix_params = {
            k.removeprefix("suffix_"): params.pop(k)
            for k in list(params)
            if k.startswith("suffix_")
        }
        fallback_name = parse_spec(arg)[0]
        if fallback_name in ("hybrid", "suffix"):
            raise VeridraftError(
                f"hybrid:{arg}: the fallback must be another kind of drafter (model:NAME, "
                "streaming, layerskip, ngram, ...); suffix always proposes first"
            )

        def spec(method: str, p: dict) -> str:  # parse_spec took the KEY=VALUE part off arg
            return method + (":" + ",".join(f"{k}={v}" for k, v in p.items()) if p else "")

        suffix = make_drafter(spec("suffix", suffix_params), model, env)
        # its own global trie: a plain `suffix` run of the same prompt in this process must
        # not hand the hybrid its answer
        suffix.scope = "hybrid"
        return cls(suffix, make_drafter(spec(arg, params), model, env), min_score=min_score)

    @property
    def unsized_trees(self) -> bool:
        return self.suffix.unsized_trees

    def __repr__(self) -> str:
        return f"HybridDrafter({self.fallback!r}, min_score={self.min_score})"

    # what the loop asks of the drafter whose proposals it verifies
    @property
    def wants_scores(self) -> bool:
        return bool(getattr(self.fallback, "wants_scores", False))

    def verify_capture(self, ctx: DecodeContext):
        fn = getattr(self.fallback, "verify_capture", None)
        return fn(ctx) if fn is not None and self._last is self.fallback else None

    @property
    def cost_key(self):
        return getattr(self.fallback, "cost_key", None)

    # -- drafter protocol --

    def prefill(self, ctx: DecodeContext) -> None:
        self.suffix.prefill(ctx)
        self.fallback.prefill(ctx)
        self._last = None

    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        draft = self.suffix.propose(ctx, max_tokens)
        if draft.tokens and self.suffix.last_score >= self.min_score:
            self._last = self.suffix
            self.suffix_rounds += 1
            return draft
        self._last = self.fallback
        self.fallback_rounds += 1
        return self.fallback.propose(ctx, max_tokens)

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        rnd = as_round(rnd, next_token)
        if self._last is self.fallback:
            self.fallback.update(rnd)
        elif self._last is self.suffix:
            self.suffix.update(rnd)
