"""`veridraft tune layerskip`: Bayesian search of the sub-layers self-speculation skips.

Draft & Verify (Zhang et al., ACL 2024, arXiv 2309.08168) drafts with the target itself, some
attention and MLP sub-layers bypassed; which ones decides the speedup, and the best set depends
on the model and the machine. Following the paper's search:

- 2L continuous variables in [0, 1] (attention of layers 0..L-1, then MLP of layers 0..L-1); a
  sub-layer is skipped when its variable is > 0.5. With `search_exit`, two more: the initial
  draft-exit threshold gamma0 and the maximum draft steps K.
- A Gaussian-process optimiser (`bayes_opt`, the library the paper's code uses; GP noise 1e-2),
  seeded ("probed") with hand-picked sets, the drafter's current default among them. Because 2L
  is large for a budget of tens of trials, every other trial is a local move (1-3 sub-layers
  flipped) from one of the best configurations so far; every trial is registered with the GP.
- The objective is the measured speedup of self-speculative greedy decoding over plain decoding
  on calibration prompts (default 8 dev-set prompts, half of them summarization, 32 new tokens).

Measuring (why a speedup and not raw tokens/s): the machine is shared and its speed drifts by
tens of percent within minutes (several-fold when other processes start), far more than the
differences between neighbouring skip sets. Each trial therefore runs plain decoding (`ar`) back
to back with the self-speculative run on every calibration prompt (which of the two goes first
alternates) and scores est. ar time / self-speculative time, measured in the same minute. With
`baseline_prompts` B < N, ar runs on B prompts only (rotating) and stored per-prompt ar times
are scaled by the drift seen on them: cheaper, but noisy on a busy machine. Prefill is done once
per prompt before the search and reused (the KV cache of the prompt is kept, the first forward
returns the stored logits): the draft never runs during prefill, so it would only add cost and
noise. At the end, the top few configurations and the hand-picked default are re-measured,
interleaved per prompt against `ar`, and the best re-measured speedup wins (the hand-picked
default when nothing beats it).

Every trial is appended to a JSONL file next to the output profile; running the same command
again resumes: past trials are re-registered with the optimiser and the search goes on to
`iters` trials in total.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VeridraftError

if TYPE_CHECKING:  # torch and the models load lazily: `veridraft --help` stays fast
    from .models.base import Skip
    from .profiles import Profile

GAMMA_RANGE = (0.2, 0.95)
K_RANGE = (1, 16)
DEFAULT_GAMMA = 0.6
DEFAULT_K = 12
GP_NOISE = 1e-2  # the paper's `alpha` for the GP regressor
TRIALS_FORMAT = "veridraft-tune-trials/1"


# ------------------------------------------------------------------------ configurations


@dataclass(frozen=True)
class Config:
    attn: tuple[int, ...]
    mlp: tuple[int, ...]
    gamma: float = DEFAULT_GAMMA
    num_tokens: int = DEFAULT_K

    @property
    def skip(self) -> Skip:
        from .models.base import Skip

        return Skip(attn=frozenset(self.attn), mlp=frozenset(self.mlp))

    def key(self) -> tuple:
        return (self.attn, self.mlp, round(self.gamma, 2), self.num_tokens)

    def describe(self) -> str:
        from .drafters.params import format_layers

        return (
            f"attn={format_layers(self.attn) or '-'} mlp={format_layers(self.mlp) or '-'} "
            f"gamma0={self.gamma:.2f} K={self.num_tokens}"
        )

    def spec(self) -> str:
        from .drafters.params import format_layers

        return (
            f"layerskip:attn={format_layers(self.attn)};mlp={format_layers(self.mlp)};"
            f"gamma={self.gamma:.3f};num_tokens={self.num_tokens}"
        )


def config_of(skip: Skip, gamma=DEFAULT_GAMMA, num_tokens=DEFAULT_K) -> Config:
    return Config(tuple(sorted(skip.attn)), tuple(sorted(skip.mlp)), float(gamma), int(num_tokens))


class Space:
    """Maps configurations to the optimiser's variables and back."""

    def __init__(self, n_layers: int, search_exit: bool) -> None:
        self.n = n_layers
        self.search_exit = search_exit
        w = len(str(n_layers - 1))
        self.attn_keys = [f"a{i:0{w}d}" for i in range(n_layers)]
        self.mlp_keys = [f"m{i:0{w}d}" for i in range(n_layers)]

    def bounds(self) -> dict:
        b = {k: (0.0, 1.0) for k in self.attn_keys + self.mlp_keys}
        if self.search_exit:
            b["gamma0"] = GAMMA_RANGE
            b["num_tokens"] = (float(K_RANGE[0]), float(K_RANGE[1]))
        return b

    def decode(self, x: dict) -> Config:
        attn = tuple(i for i, k in enumerate(self.attn_keys) if float(x[k]) > 0.5)
        mlp = tuple(i for i, k in enumerate(self.mlp_keys) if float(x[k]) > 0.5)
        if self.search_exit:
            g = min(max(float(x["gamma0"]), GAMMA_RANGE[0]), GAMMA_RANGE[1])
            k = int(round(min(max(float(x["num_tokens"]), K_RANGE[0]), K_RANGE[1])))
            return Config(attn, mlp, round(g, 3), k)
        return Config(attn, mlp)

    def encode(self, c: Config) -> dict:
        """A point inside the region of `c` (0.25 = kept, 0.75 = skipped)."""
        x = {k: (0.75 if i in c.attn else 0.25) for i, k in enumerate(self.attn_keys)}
        x.update({k: (0.75 if i in c.mlp else 0.25) for i, k in enumerate(self.mlp_keys)})
        if self.search_exit:
            x["gamma0"] = float(c.gamma)
            x["num_tokens"] = float(c.num_tokens)
        return x

    def valid(self, c: Config) -> bool:
        return not (len(c.attn) == self.n and len(c.mlp) == self.n)

    def mutate(self, c: Config, rng: random.Random) -> Config:
        """Flip 1-3 sub-layers (and, when searching exits, jitter gamma0 / K)."""
        attn, mlp = set(c.attn), set(c.mlp)
        for _ in range(rng.choice((1, 1, 2, 3))):
            s = attn if rng.random() < 0.5 else mlp
            s.symmetric_difference_update({rng.randrange(self.n)})
        g, k = c.gamma, c.num_tokens
        if self.search_exit and rng.random() < 0.5:
            g = round(min(max(g + rng.choice((-0.1, -0.05, 0.05, 0.1)), GAMMA_RANGE[0]), 0.95), 3)
            k = min(max(k + rng.choice((-2, -1, 1, 2)), K_RANGE[0]), K_RANGE[1])
        return Config(tuple(sorted(attn)), tuple(sorted(mlp)), g, k)


def hand_picked(model) -> Config:
    """The drafter's built-in default for this model (the hand-picked set, or the heuristic)."""
    from .drafters.layerskip import DEFAULT_SKIPS, heuristic_skip

    n = model.net.config.n_layers
    skip = DEFAULT_SKIPS.get(getattr(model, "name", None)) or heuristic_skip(n)
    return config_of(skip)


def probe_configs(
    model, existing: Profile | None = None, search_exit: bool = False
) -> list[Config]:
    """Hand-picked starting points, scaled to the model's depth; the default set first (at the
    drafter's default gamma0 / K). When searching exits, the other sets start at a stricter
    exit (gamma0 0.8, K 8): on small models the cheap drafts are too unsure to run 12 steps."""
    n = model.net.config.n_layers
    from .drafters.layerskip import heuristic_skip
    from .models.base import Skip

    out = [hand_picked(model)]
    if existing is not None:
        out.append(config_of(existing.skip))
    r = range
    for attn, mlp in (
        (r(n // 2, n - 1), ()),  # late attention only
        (r(n // 4, n - 1, 2), ()),  # every other attention, middle and late
        (r(n // 2, n - 2), r(2 * n // 3, n - 2)),  # late attention + a few late MLPs
        (r(2 * n // 3, n - 1), ()),  # a small late block of attention
        (r(n // 3, n - 1), r(n // 2, n - 4, 3)),
    ):
        out.append(config_of(Skip(attn=frozenset(attn), mlp=frozenset(mlp))))
    out.append(config_of(heuristic_skip(n)))
    if search_exit:
        out = out[:1] + [Config(c.attn, c.mlp, 0.8, 8) for c in out[1:]]
    seen, uniq = set(), []
    for c in out:
        if (c.attn or c.mlp) and c.key() not in seen and not (len(c.attn) == len(c.mlp) == n):
            seen.add(c.key())
            uniq.append(c)
    return uniq


# ------------------------------------------------------------------------ calibration


def calibration_questions(path: str | Path | None, n: int):
    """n questions: half (rounded up) from summarization, the rest spread over the other groups
    of the file in Spec-Bench order; a file without summarization gives n spread over all."""
    from .bench.questions import default_questions_path, groups_in, load_questions, spread

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
        import torch

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
        import torch

        from .decode import decode
        from .sampling import SamplingParams

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


def _drafter(c: Config):
    from .drafters.layerskip import LayerSkipDrafter

    return LayerSkipDrafter(c.skip, gamma=c.gamma, num_tokens=c.num_tokens)


def measure(cal: Calibration, c: Config, baseline: list[int], salt: int = 0) -> dict:
    """One trial: self-speculative decoding of every prompt (one drafter instance, so gamma
    adapts across prompts as in the paper), plain decoding re-measured on `baseline` prompts
    interleaved; the speedup uses the ar references scaled by the drift seen now."""
    d = _drafter(c)
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


def trials_path_for(out: Path) -> Path:
    """PROFILE.json -> PROFILE.trials.jsonl beside it."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.parent / f"{stem}.trials.jsonl"


def read_trials(path: Path, header: dict) -> list[dict]:
    """Past trials of the same search (same model, precision, prompts and space), or []."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the last line of an interrupted write
                print(f"tune: ignoring a partial last line in {path}", file=sys.stderr)
                continue
            raise VeridraftError(f"{path}, line {n}: not valid JSON; delete the file") from None
    if not rows or rows[0].get("kind") != "header" or rows[0].get("format") != TRIALS_FORMAT:
        raise VeridraftError(f"{path} is not a veridraft trials file; delete it or pick --out")
    old = rows[0]
    for k in ("model", "precision", "n_layers", "calibration", "search_exit", "max_new_tokens"):
        if old.get(k) != header.get(k):
            raise VeridraftError(
                f"{path} holds trials of another search ({k}: {old.get(k)!r} there, "
                f"{header.get(k)!r} now); delete it or pick another --out"
            )
    return [r for r in rows[1:] if r.get("kind") == "trial"]


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


# ------------------------------------------------------------------------ the search


@dataclass
class TuneResult:
    profile: Profile
    path: Path | None
    trials_path: Path
    trials: list[dict]
    final: list[dict] = field(default_factory=list)


def _optimizer(space: Space, seed: int):
    try:
        from bayes_opt import BayesianOptimization, acquisition
    except ImportError as e:
        raise VeridraftError(
            "veridraft tune needs the bayesian-optimization package: pip install "
            "'bayesian-optimization>=3,<4'"
        ) from e
    opt = BayesianOptimization(
        f=None,
        pbounds=space.bounds(),
        acquisition_function=acquisition.ExpectedImprovement(xi=0.01),
        random_state=seed,
        verbose=0,
        allow_duplicate_points=True,
    )
    opt.set_gp_params(alpha=GP_NOISE)
    return opt


def tune_layerskip(
    model,
    *,
    calib: str | Path | None = None,
    prompts: int = 8,
    max_new_tokens: int = 32,
    iters: int = 100,
    time_budget: float | None = None,
    out: str | Path | None = None,
    search_exit: bool = False,
    precision: str = "fp32",
    threads: int | None = None,
    seed: int = 1,
    baseline_prompts: int | None = None,
    final_top: int = 3,
    final_rounds: int = 2,
    progress: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
) -> TuneResult:
    """Search the layerskip drafter's skip sets (and exit settings) for `model`; write and
    return the profile. `model` is a LoadedModel or a name for `veridraft.load`. time_budget is
    in minutes and covers the whole run (the final re-measurement included, estimated)."""
    import torch

    from .profiles import Profile, file_name, model_identity, profiles_home, save_profile

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if iters < 1:
        raise VeridraftError(f"--iters must be at least 1, got {iters}")
    if max_new_tokens < 2:
        raise VeridraftError(f"--max-new-tokens must be at least 2, got {max_new_tokens}")
    if time_budget is not None and time_budget <= 0:
        raise VeridraftError(f"--time-budget must be positive (minutes), got {time_budget}")
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    if isinstance(model, str | Path):
        from .loader import load

        model = load(str(model), precision=precision)
    ident = model_identity(model)
    n_layers = ident["n_layers"]
    prec = ident["precision"] or precision
    out = Path(out) if out else profiles_home() / file_name(model.name, prec)
    trials_path = trials_path_for(out)

    qpath, qs = calibration_questions(calib, prompts)
    from .generate import prompt_ids_for

    ids = [prompt_ids_for(model, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    ctx = model.context_length
    ids = [
        p[-(ctx - max_new_tokens - 80) :] if len(p) + max_new_tokens + 80 > ctx else p for p in ids
    ]
    log(
        f"tune layerskip: {model.name} [{prec}], {n_layers} layers, {len(qs)} calibration "
        f"prompts from {qpath} ({', '.join(f'{q.group}:{q.question_id}' for q in qs)}; "
        f"{sum(map(len, ids))} prompt tokens), {max_new_tokens} new tokens each, "
        f"{torch.get_num_threads()} threads"
    )
    cal = Calibration(model, ids, max_new_tokens)
    if baseline_prompts is None:
        baseline_prompts = len(ids)
    if not 1 <= baseline_prompts <= len(ids):
        raise VeridraftError(f"--baseline-prompts must be between 1 and {len(ids)}")
    space = Space(n_layers, search_exit)
    header = {
        "kind": "header",
        "format": TRIALS_FORMAT,
        "model": model.name,
        "precision": prec,
        "n_layers": n_layers,
        "source_sha256": ident["source_sha256"],
        "calibration": cal.fingerprint(),
        "questions": [q.question_id for q in qs],
        "questions_file": str(qpath),
        "max_new_tokens": max_new_tokens,
        "search_exit": search_exit,
    }
    past = read_trials(trials_path, header)
    if not past:
        trials_path.parent.mkdir(parents=True, exist_ok=True)
        trials_path.write_text(json.dumps(header) + "\n", encoding="utf-8")
    else:
        log(f"resuming: {len(past)} trials already in {trials_path}")

    # warm-up, then plain-decoding references on every prompt
    hp = hand_picked(model)
    cal.run(0, None)
    cal.run(0, _drafter(hp))
    for i in range(len(ids)):
        cal.run_ar(i)
    ar_total = sum(cal.ar_ref(i) for i in range(len(ids)))
    log(
        f"plain decoding: {sum(map(len, cal.ar_ids))} tokens in {ar_total:.1f} s "
        f"({sum(map(len, cal.ar_ids)) / ar_total:.1f} tokens/s, decode only)"
    )

    existing = None
    try:
        from .profiles import profile_for

        existing = profile_for(model)
    except VeridraftError as e:
        log(f"note: the current profile is not usable ({e}); not probing it")
    opt = _optimizer(space, seed)
    rng = random.Random(seed + len(past))
    trials = list(past)
    scores: dict[tuple, list[float]] = {}
    configs: dict[tuple, Config] = {}

    def remember(c: Config, x: dict, score: float) -> None:
        opt.register(params=x, target=float(score))
        scores.setdefault(c.key(), []).append(float(score))
        configs[c.key()] = c

    for t in past:
        c = Config(tuple(t["attn"]), tuple(t["mlp"]), float(t["gamma0"]), int(t["num_tokens"]))
        remember(c, t["x"], t["speedup"])

    def ranked() -> list[tuple[float, Config]]:
        return sorted(
            ((statistics.mean(v), configs[k]) for k, v in scores.items()),
            key=lambda p: -p[0],
        )

    probes = [c for c in probe_configs(model, existing, search_exit) if c.key() not in scores]
    per_trial = ar_total * (1 + baseline_prompts / len(ids))  # rough, refined as we go
    final_cost = final_rounds * (final_top + 2) * ar_total

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=iters,
            initial=min(len(trials), iters),
            file=sys.stderr,
            unit="trial",
            dynamic_ncols=True,
        )
    say = bar.write if bar is not None else log
    n_new = 0
    stopped = "iters"
    try:
        while len(trials) < iters:
            elapsed = time.perf_counter() - t_start
            if time_budget is not None and elapsed + per_trial + final_cost > time_budget * 60:
                stopped = "time budget"
                break
            if probes:
                c, source = probes.pop(0), "probe"
                x = space.encode(c)
            elif len(trials) % 2 == 0 or len(scores) < 2:
                x = {k: float(v) for k, v in opt.suggest().items()}
                c, source = space.decode(x), "bo"
                if c.key() in scores or not space.valid(c):
                    # the GP wants a region already measured: move locally from it instead
                    c, source = space.mutate(c, rng), "bo+local"
                    x = space.encode(c)
            else:
                top = [cc for _, cc in ranked()[:3]]
                c, source = space.mutate(rng.choice(top), rng), "local"
                x = space.encode(c)
            tries = 0
            while (c.key() in scores or not space.valid(c) or not (c.attn or c.mlp)) and tries < 50:
                c, tries = space.mutate(c, rng), tries + 1
                x = space.encode(c)
            t0 = time.perf_counter()
            base = [
                (len(trials) * baseline_prompts + j) % len(ids) for j in range(baseline_prompts)
            ]
            m = measure(cal, c, base, salt=len(trials))
            per_trial = 0.7 * per_trial + 0.3 * (time.perf_counter() - t0)
            row = {
                "kind": "trial",
                "trial": len(trials),
                "source": source,
                "attn": list(c.attn),
                "mlp": list(c.mlp),
                "gamma0": c.gamma,
                "num_tokens": c.num_tokens,
                "x": x,
                **m,
                "baseline_prompts": base,
                "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            _append(trials_path, row)
            trials.append(row)
            remember(c, x, m["speedup"])
            n_new += 1
            if not m["exact"]:
                say(f"WARNING: trial {row['trial']} output differs from plain decoding (bug?)")
            best, bc = ranked()[0]
            a = f"{m['alpha']:.2f}" if m["alpha"] is not None else "-"
            say(
                f"trial {row['trial']:3d} {source:8s} {m['speedup']:.3f}x tau {m['tau']:.2f} "
                f"alpha {a} drift {m['drift']:.2f} | {c.describe()}"
            )
            if bar is not None:
                bar.set_postfix_str(f"best {best:.3f}x", refresh=False)
                bar.update(1)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        log(f"interrupted: {len(trials)} trials are saved in {trials_path}; run again to resume")
        raise
    finally:
        if bar is not None:
            bar.close()
    if not scores:
        raise VeridraftError("tune: no trial ran (time budget too small?)")
    log(f"search stopped ({stopped}): {len(trials)} trials ({n_new} new)")

    # final: re-measure the best few and the hand-picked default, interleaved against ar
    cands = [c for _, c in ranked()[:final_top]]
    if hp.key() not in {c.key() for c in cands}:
        cands.append(hp)
    final = _final(cal, cands, final_rounds, rng)
    for f in final:
        say(
            f"final {f['speedup']:.3f}x tau {f['tau']:.2f} (search {statistics.mean(scores.get(f['key'], [float('nan')])):.3f}x)"
            f"{' [hand-picked]' if f['key'] == hp.key() else ''} | {f['config'].describe()}"
        )
        _append(
            trials_path,
            {
                "kind": "final",
                "attn": list(f["config"].attn),
                "mlp": list(f["config"].mlp),
                "gamma0": f["config"].gamma,
                "num_tokens": f["config"].num_tokens,
                **{k: v for k, v in f.items() if k not in ("config", "key")},
            },
        )
    win = max(final, key=lambda f: f["speedup"])
    hand = next(f for f in final if f["key"] == hp.key())
    wc: Config = win["config"]

    from importlib.metadata import version

    from .bench.harness import cpu_name

    prof = Profile(
        model=model.name,
        n_layers=n_layers,
        precision=prec,
        skip=wc.skip,
        gamma=round(float(win["gamma_end"]), 4),
        num_tokens=wc.num_tokens,
        source_sha256=ident["source_sha256"],
        architecture=ident["architecture"],
        figures={
            "speedup": round(win["speedup"], 4),
            "tau": round(win["tau"], 4),
            "alpha": None if win["alpha"] is None else round(win["alpha"], 4),
            "tokens_per_s": round(win["tokens_per_s"], 3),
            "ar_tokens_per_s": round(win["ar_tokens_per_s"], 3),
            "hand_picked_speedup": round(hand["speedup"], 4),
            "hand_picked_tau": round(hand["tau"], 4),
            "search_speedup": round(statistics.mean(scores[win["key"]]), 4),
            "measured_on": (
                f"{len(ids)} prompts x {max_new_tokens} new tokens, greedy, decode phase "
                f"(prefill excluded), {final_rounds} interleaved rounds vs ar"
            ),
        },
        search={
            "optimizer": f"bayes_opt {version('bayesian-optimization')} GP (EI xi=0.01, "
            f"noise {GP_NOISE}) + local moves",
            "objective": "speedup over plain decoding (ar re-measured per trial on "
            f"{baseline_prompts} prompt(s), drift-scaled)",
            "trials": len(trials),
            "stopped": stopped,
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "search_exit": search_exit,
            "gamma0": wc.gamma,
            "gamma_end": round(float(win["gamma_end"]), 4),
            "questions_file": str(qpath),
            "questions": [q.question_id for q in qs],
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "trials_file": str(trials_path),
            "is_hand_picked": win["key"] == hp.key(),
        },
        machine={
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "veridraft": _version(),
        },
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=command or "",
    )
    path = save_profile(prof, out)
    prof.path = path
    log(f"profile: {path}\n  {prof.describe()}")
    log(
        f"  hand-picked default: {hand['speedup']:.3f}x (tau {hand['tau']:.2f}); "
        f"tuned: {win['speedup']:.3f}x (tau {win['tau']:.2f})"
    )
    if win["speedup"] < 1.0:
        log(
            "  WARNING: no configuration tried beats plain decoding on this machine; the draft "
            "costs nearly a full forward here (see docs/tuning.md)"
        )
    return TuneResult(prof, path, trials_path, trials, final)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("veridraft")
    except Exception:
        return "?"


def _final(cal: Calibration, cands: list[Config], rounds: int, rng: random.Random) -> list[dict]:
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
        drafters = {c.key(): _drafter(c) for c in cands}
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


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "tune",
        help="tune a drafter for a model on this machine (layerskip: Bayesian search of skips)",
        description="Tune a drafter for a model on this machine and write a profile that the "
        "drafter then loads by default.",
    )
    sub = p.add_subparsers(dest="tune_cmd", required=True, metavar="{layerskip}")
    t = sub.add_parser(
        "layerskip",
        help="search the attention / MLP sub-layers that self-speculation skips",
        description=(__doc__ or "").split("\n\n")[0],
    )
    t.add_argument("--model", "-m", default="smollm2-135m", help="catalog name, GGUF or HF folder")
    t.add_argument(
        "--calib",
        default=None,
        metavar="FILE",
        help="Spec-Bench-format JSONL of calibration questions "
        "(default ../shared/data/spec_bench_dev.jsonl)",
    )
    t.add_argument("--prompts", type=int, default=8, metavar="N", help="calibration prompts (8)")
    t.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="T", help="new tokens per prompt (32)"
    )
    t.add_argument("--iters", type=int, default=100, metavar="N", help="trials in total (100)")
    t.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MIN",
        help="stop in about MIN minutes, the final re-measurement included",
    )
    t.add_argument(
        "--out",
        default=None,
        metavar="PROFILE.json",
        help="profile to write (default $VERIDRAFT_HOME/profiles/layerskip.<model>.<precision>"
        ".json, where `layerskip` finds it); trials go to PROFILE.trials.jsonl beside it",
    )
    t.add_argument(
        "--search-exit", action="store_true", help="also search initial gamma and max draft steps"
    )
    t.add_argument(
        "--precision",
        default="fp32",
        help="precision to load and tune in: fp32 (default) | fp16w | bf16",
    )
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument(
        "--baseline-prompts",
        type=int,
        default=None,
        metavar="B",
        help="prompts on which each trial re-measures plain decoding, back to back with the "
        "draft run (default: all, a fully interleaved baseline; fewer is cheaper but scales "
        "stored ar times by the drift seen on B prompts, which is noisy on a busy machine)",
    )
    t.add_argument("--final-top", type=int, default=3, metavar="N", help="re-measured at the end")
    t.add_argument("--final-rounds", type=int, default=2, metavar="R")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_tune_cli)
    return p


def _tune_cli(args: argparse.Namespace) -> int:
    if args.baseline_prompts is not None and not 1 <= args.baseline_prompts <= args.prompts:
        raise VeridraftError(f"--baseline-prompts must be between 1 and --prompts ({args.prompts})")
    argv = sys.argv[1:]
    command = "veridraft " + shlex.join(argv) if argv else "veridraft tune layerskip"
    res = tune_layerskip(
        args.model,
        calib=args.calib,
        prompts=args.prompts,
        max_new_tokens=args.max_new_tokens,
        iters=args.iters,
        time_budget=args.time_budget,
        out=args.out,
        search_exit=args.search_exit,
        precision=args.precision,
        threads=args.threads,
        seed=args.seed,
        baseline_prompts=args.baseline_prompts,
        final_top=args.final_top,
        final_rounds=args.final_rounds,
        progress=not args.no_progress,
        command=command,
    )
    print(res.path)
    return 0
