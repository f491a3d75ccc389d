"""Calibration for the layerskip search: prompts prefilled once, plain-decoding references, and
timed trials (one trial during the search, the interleaved re-measurement at the end)."""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bench.questions import default_questions_path, groups_in, load_questions, spread
from ..decode import decode
from ..drafters.layerskip import LayerSkipDrafter
from ..errors import VeridraftError
from ..sampling import SamplingParams
from .space import Config


def calibration_questions(path: str | Path | None, n: int):
    """n questions: half (rounded up) from summarization, the rest spread over the other groups
    of the file in Spec-Bench order; a file without summarization gives n spread over all."""
    if n < 1:
        raise VeridraftError(f"--prompts must be at least 1, got {n}")
    qpath = Path(path) if path else default_questions_path()
    qs = load_questions(qpath)
    by_group: dict[str, list] = {}
    for q in qs:
        by_group.setdefault(q.group, []).append(q)
    summ = by_group.get("summarization", [])
    n_summ = min(len(summ), (n + 1) // 2) if len(by_group) > 1 else min(len(summ), n)
    picked = [summ[i] for i in spread(len(summ), n_summ)]
    others = [g for g in groups_in(qs) if g != "summarization"]
    rest = n - len(picked)
    j = 0
    while rest > 0 and others:
        g = others[j % len(others)]
        used = {q.question_id for q in picked}
        cand = [q for q in by_group[g] if q.question_id not in used]
        if cand:
            k = sum(1 for q in picked if q.group == g)
            picked.append(cand[min(len(cand) - 1, (k * len(cand)) // max(1, rest))])
            rest -= 1
        elif all(
            q.question_id in {p.question_id for p in picked} for g2 in others for q in by_group[g2]
        ):
            break
        j += 1
    if len(picked) < n:
        raise VeridraftError(
            f"{qpath} has only {len(picked)} usable questions; asked for --prompts {n}"
        )
    return qpath, picked


class _Prefilled:
    """A target whose prompt is already prefilled: `new_cache` hands back the prompt's cache cut
    back to the prompt, and the next forward (decode's prefill) returns the stored last logits.
    Everything else goes to the real network, so `decode` runs unchanged."""

    def __init__(self, net, ids: list[int], max_new_tokens: int, margin: int = 64) -> None:
        self.net = net
        self.ids = list(ids)
        self.cache = net.new_cache(len(ids) + max_new_tokens + margin)
        with torch.inference_mode():
            logits = net(torch.tensor(self.ids, dtype=torch.long), self.cache, num_logits=1)
        self.logits = logits.clone()
        self._pending = False

    def new_cache(self, max_len: int):
        if max_len > self.cache.max_len:
            raise VeridraftError(
                f"tune: prefilled cache too small ({self.cache.max_len} < {max_len})"
            )
        self.cache.truncate(len(self.ids))
        self._pending = True
        return self.cache

    def __call__(self, tokens, cache, **kw):
        if self._pending and cache is self.cache:
            self._pending = False
            return self.logits
        return self.net(tokens, cache, **kw)

    def __getattr__(self, name):
        return getattr(self.net, name)


@dataclass
class Run:
    ids: list[int]
    seconds: float
    forwards: int
    emitted: int
    drafted: int
    accepted: int


class Calibration:
    """Prefilled prompts, plain-decoding references, and timed runs on them."""

    def __init__(self, model, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.prompts = [_Prefilled(model.net, ids, max_new_tokens) for ids in prompt_ids]
        self.ar_ids: list[list[int]] = []
        self.ar_hist: list[list[float]] = [[] for _ in prompt_ids]

    def run(self, i: int, drafter) -> Run:
        pf = self.prompts[i]
        tok = self.model.tokenizer
        t0 = time.perf_counter()
        new, st = decode(
            pf,
            pf.ids,
            max_new_tokens=self.max_new_tokens,
            sampling=SamplingParams(temperature=0.0),
            generator=torch.Generator().manual_seed(0),
            drafter=drafter,
            eos_ids=tok.eos_ids,
            tokenizer=tok,
        )
        dt = time.perf_counter() - t0
        return Run(list(new), dt, st.target_forwards, st.emitted_in_rounds, st.drafted, st.accepted)

    def run_ar(self, i: int) -> float:
        r = self.run(i, None)
        if len(self.ar_ids) > i:
            if r.ids != self.ar_ids[i]:
                raise VeridraftError("tune: plain decoding is not deterministic on this machine")
        else:
            self.ar_ids.append(r.ids)
        self.ar_hist[i].append(r.seconds)
        return r.seconds

    def ar_ref(self, i: int) -> float:
        return statistics.median(self.ar_hist[i])

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(json.dumps(p.ids).encode())
        h.update(str(self.max_new_tokens).encode())
        return h.hexdigest()[:16]


def drafter_for(c: Config) -> LayerSkipDrafter:
    """A fresh layerskip drafter with the configuration's skip set and exit settings."""
    return LayerSkipDrafter(c.skip, gamma=c.gamma, num_tokens=c.num_tokens)


def measure(cal: Calibration, c: Config, baseline: list[int], salt: int = 0) -> dict:
    """One trial: self-speculative decoding of every prompt (one drafter instance, so gamma
    adapts across prompts as in the paper), plain decoding re-measured on `baseline` prompts
    interleaved; the speedup uses the ar references scaled by the drift seen now."""
    d = drafter_for(c)
    ls_s, ar_now, ar_then = 0.0, 0.0, 0.0
    fw = em = dr = ac = tokens = 0
    exact = True
    for i in range(len(cal.prompts)):
        ar_first = (i + salt) % 2 == 0  # alternate which of the pair runs first
        if i in baseline:
            ar_then += cal.ar_ref(i)
            if ar_first:
                ar_now += cal.run_ar(i)
        r = cal.run(i, d)
        if i in baseline and not ar_first:
            ar_now += cal.run_ar(i)
        ls_s += r.seconds
        fw, em, dr, ac = fw + r.forwards, em + r.emitted, dr + r.drafted, ac + r.accepted
        tokens += len(r.ids)
        exact = exact and r.ids == cal.ar_ids[i]
    drift = ar_now / ar_then if ar_then > 0 else 1.0
    ar_est = drift * sum(cal.ar_ref(i) for i in range(len(cal.prompts)))
    return {
        "speedup": ar_est / ls_s if ls_s > 0 else 0.0,
        "ls_s": ls_s,
        "ar_est_s": ar_est,
        "drift": drift,
        "tokens": tokens,
        "tokens_per_s": tokens / ls_s if ls_s > 0 else 0.0,
        "tau": em / fw if fw else 1.0,
        "alpha": ac / dr if dr else None,
        "gamma_end": d.gamma,
        "exact": exact,
    }


# ------------------------------------------------------------------------ trials file


def remeasure(cal: Calibration, cands: list[Config], rounds: int, rng: random.Random) -> list[dict]:
    """Every candidate against ar, interleaved per prompt with a rotating order."""
    n = len(cal.prompts)
    acc = {
        c.key(): {"ls": 0.0, "ar": 0.0, "fw": 0, "em": 0, "dr": 0, "ac": 0, "tok": 0, "g": c.gamma}
        for c in cands
    }
    ar_s = 0.0
    ar_tok = 0
    slot = 0
    for _ in range(max(1, rounds)):
        drafters = {c.key(): drafter_for(c) for c in cands}
        for i in range(n):
            order = [None, *cands]
            k = slot % len(order)
            order = order[k:] + order[:k]
            slot += 1
            t_ar = None
            runs = {}
            for c in order:
                if c is None:
                    t_ar = cal.run_ar(i)
                else:
                    runs[c.key()] = cal.run(i, drafters[c.key()])
            ar_s += t_ar
            ar_tok += len(cal.ar_ids[i])
            for key, r in runs.items():
                a = acc[key]
                a["ls"] += r.seconds
                a["ar"] += t_ar
                a["fw"] += r.forwards
                a["em"] += r.emitted
                a["dr"] += r.drafted
                a["ac"] += r.accepted
                a["tok"] += len(r.ids)
        for key, d in drafters.items():
            acc[key]["g"] = d.gamma
    out = []
    for c in cands:
        a = acc[c.key()]
        out.append(
            {
                "config": c,
                "key": c.key(),
                "speedup": a["ar"] / a["ls"] if a["ls"] > 0 else 0.0,
                "tau": a["em"] / a["fw"] if a["fw"] else 1.0,
                "alpha": a["ac"] / a["dr"] if a["dr"] else None,
                "tokens_per_s": a["tok"] / a["ls"] if a["ls"] > 0 else 0.0,
                "ar_tokens_per_s": ar_tok / ar_s if ar_s > 0 else 0.0,
                "gamma_end": a["g"],
            }
        )
    return out


# ------------------------------------------------------------------------ CLI
