"""The benchmarked methods: veridraft's own (`ar`, any drafter spec) and the peers', built from
the `--methods` list."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence

from ..auto import AUTO
from ..drafters import DRAFTERS, make_drafter
from ..errors import VeridraftError
from ..generate import draft_env, generate_ids, slowdown_warning
from ..presses import make_press
from ..rules import make_rule, split_method
from .base import PEER_ENGINES, Method, RunOutput
from .peers import make_peer

KV_SEP = "+kv:"


class VeridraftMethod(Method):
    """`ar` (plain decoding) or any drafter spec (`ngram:num_tokens=8`, `layerskip`, ...),
    optionally on a compressed target: `METHOD+kv:PRESS` (lossy), e.g. `ar+kv:snapkv:budget=1024`
    or `ngram+kv:adakv:budget=0.25`; its speedup is measured against `ar+kv:PRESS` when that is
    benchmarked too, and its exact match against `ar` is its agreement with the full model."""

    def __init__(self, spec: str, model) -> None:
        super().__init__(spec)
        self.model = model
        # "ngram+loose:topk=5": a drafter and an acceptance rule (rules.py)
        spec, self.verify = split_method(spec)
        spec, _, self.kv = spec.partition(KV_SEP)
        self.kv = self.kv or None
        self.draft = None if spec == "ar" else spec
        if self.kv is not None and self.draft is not None:
            self.baseline = f"ar{KV_SEP}{self.kv}"
        # one lookup of profiles and cost model for every run: none inside the timed window
        self.env = draft_env(model)
        self.warning: str | None = None  # why this method is expected to lose here, if so

    def _drafter(self):
        if self.draft is None:
            return None
        if self.draft == AUTO:  # generate_ids picks per prompt, as generate() does by default
            return AUTO
        return make_drafter(self.draft, self.model, env=self.env)

    def prepare(self) -> None:
        d = self._drafter()  # fails early on a bad spec
        lossy_rule = False
        if self.verify is not None:
            net = getattr(self.model, "net", self.model)
            rule = make_rule(self.verify, self.model.tokenizer, net.config.vocab_size)
            lossy_rule = rule.lossy
        self.lossless = not (bool(getattr(d, "lossy", False)) or lossy_rule)
        if self.kv is not None:
            make_press(self.kv)  # fails early on a bad spec
            self.lossless = False
        self.warning = None if d == AUTO else slowdown_warning(d, self.model, self.env)
        if self.warning:
            # the reason names its drafter already ("layerskip: the tuned profile ..."); the
            # method's spec goes first only when it says more than that name
            said = self.warning
            if not said.startswith(f"{self.name}:"):
                said = f"{self.name}: {said}"
            print(f"bench: warning: {said}", file=sys.stderr)

    def info(self) -> dict:
        return {**super().info(), "warning": self.warning}

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        model = self.model
        ctx = getattr(model, "context_length", None)
        if ctx is not None and len(prompt_ids) + max_new_tokens > ctx:
            raise VeridraftError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the context length ({ctx})"
            )
        drafter = self._drafter()  # like generate(): a fresh drafter per call, untimed
        tok = model.tokenizer
        t0 = time.perf_counter()
        new, stats = generate_ids(
            model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            draft=drafter,
            env=self.env,
            warn=False,  # said once in prepare()
            kv=self.kv,
            verify=self.verify,
        )
        wall = time.perf_counter() - t0
        reason = "eos" if new and new[-1] in tok.eos_ids else "length"
        return RunOutput(
            ids=list(new),
            wall_s=wall,
            prefill_s=stats.prefill_s,
            stats=stats.to_dict(),
            finish_reason=reason,
        )


def _known_method_names() -> set[str]:
    return {"ar", AUTO, *PEER_ENGINES, *DRAFTERS}


def split_methods(text: str | Sequence[str]) -> list[str]:
    """Split `--methods` on commas, keeping drafter parameters together: a piece that does not
    start with a method name (`ar`, a drafter, `hf`, `llamacpp`) continues the previous
    method's spec, so `ar,ngram:num_tokens=8,max_ngram=3,layerskip:attn=1-3,5,hf:ar` gives
    ar | ngram:num_tokens=8,max_ngram=3 | layerskip:attn=1-3,5 | hf:ar."""
    pieces = [text] if isinstance(text, str) else list(text)
    known = _known_method_names()
    out: list[str] = []
    for chunk in pieces:
        for p in (s.strip() for s in chunk.split(",")):
            if not p:
                continue
            head = re.split(r"[:+]", p, maxsplit=1)[0].strip().lower()
            if head not in known and out and ":" in out[-1]:
                out[-1] += "," + p
            else:
                out.append(p)
    seen: set[str] = set()
    dup = [m for m in out if m in seen or seen.add(m)]
    if dup:
        raise VeridraftError(f"method {dup[0]!r} is listed twice in --methods")
    if not out:
        raise VeridraftError("--methods is empty")
    return out


def make_method(spec: str, model, threads: int = 2) -> Method:
    """A Method for a spec: `hf:...` and `llamacpp:...` are peers, anything else is veridraft."""
    if spec.startswith(tuple(f"{e}:" for e in PEER_ENGINES)):
        return make_peer(spec, model, threads=threads)
    return VeridraftMethod(spec, model)
