"""The layerskip search: Bayesian optimisation interleaved with local moves, resumable from
the trials file, then the re-measurement of the best configurations and the profile."""

from __future__ import annotations

import datetime
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import VeridraftError
from ..generate import prompt_ids_for
from ..loader import load
from ..profiles import (
    Profile,
    file_name,
    model_identity,
    profile_for,
    profiles_home,
    recorded_path,
)
from .calibration import Calibration, calibration_questions, drafter_for, measure, remeasure
from .space import Config, Space, hand_picked, probe_configs
from .trials import TRIALS_FORMAT, append_row, read_trials, start_trials, trials_path_for
from .write import build_profile, write_profile

GP_NOISE = 1e-2  # the paper's `alpha` for the GP regressor


@dataclass
class TuneResult:
    profile: Profile
    path: Path | None
    trials_path: Path
    trials: list[dict]
    final: list[dict] = field(default_factory=list)


def _optimizer(space: Space, seed: int):
    # bayes_opt is imported on use: a clear message names the package when it is missing.
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


@dataclass
class Search:
    """The optimiser and what it has seen: every trial's speedup per configuration."""

    space: Space
    opt: object
    rng: random.Random
    trials: list[dict]
    scores: dict[tuple, list[float]] = field(default_factory=dict)
    configs: dict[tuple, Config] = field(default_factory=dict)

    def remember(self, c: Config, x: dict, score: float) -> None:
        self.opt.register(params=x, target=float(score))
        self.scores.setdefault(c.key(), []).append(float(score))
        self.configs[c.key()] = c

    def ranked(self) -> list[tuple[float, Config]]:
        return sorted(
            ((statistics.mean(v), self.configs[k]) for k, v in self.scores.items()),
            key=lambda p: -p[0],
        )

    def next_config(self, probes: list[Config]) -> tuple[Config, dict, str]:
        """The next configuration to measure: a probe first, then alternately the GP's
        suggestion and a local move from one of the best so far; never one already measured."""
        space, rng = self.space, self.rng
        if probes:
            c, source = probes.pop(0), "probe"
            x = space.encode(c)
        elif len(self.trials) % 2 == 0 or len(self.scores) < 2:
            x = {k: float(v) for k, v in self.opt.suggest().items()}
            c, source = space.decode(x), "bo"
            if c.key() in self.scores or not space.valid(c):
                # the GP wants a region already measured: move locally from it instead
                c, source = space.mutate(c, rng), "bo+local"
                x = space.encode(c)
        else:
            top = [cc for _, cc in self.ranked()[:3]]
            c, source = space.mutate(rng.choice(top), rng), "local"
            x = space.encode(c)
        tries = 0
        while (
            c.key() in self.scores or not space.valid(c) or not (c.attn or c.mlp)
        ) and tries < 50:
            c, tries = space.mutate(c, rng), tries + 1
            x = space.encode(c)
        return c, x, source


def _calibration_prompts(model, calib, prompts: int, max_new_tokens: int):
    """The calibration questions and their prompt ids, cut to fit the context."""
    qpath, qs = calibration_questions(calib, prompts)
    ids = [prompt_ids_for(model, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    ctx = model.context_length
    ids = [
        p[-(ctx - max_new_tokens - 80) :] if len(p) + max_new_tokens + 80 > ctx else p for p in ids
    ]
    return qpath, qs, ids


def _run_trials(
    search: Search,
    cal: Calibration,
    probes: list[Config],
    *,
    iters: int,
    time_budget: float | None,
    t_start: float,
    per_trial: float,
    final_cost: float,
    baseline_prompts: int,
    trials_path: Path,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[str, int, Callable[[str], None]]:
    """Measure configurations until `iters` trials or the time budget; every trial is appended
    to the trials file. Returns why it stopped, how many trials are new, and the logger."""
    n_prompts = len(cal.prompts)
    trials = search.trials
    bar = None
    if progress:
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
            c, x, source = search.next_config(probes)
            t0 = time.perf_counter()
            base = [
                (len(trials) * baseline_prompts + j) % n_prompts for j in range(baseline_prompts)
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
            append_row(trials_path, row)
            trials.append(row)
            search.remember(c, x, m["speedup"])
            n_new += 1
            if not m["exact"]:
                say(f"WARNING: trial {row['trial']} output differs from plain decoding (bug?)")
            best, _ = search.ranked()[0]
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
    return stopped, n_new, say


def _final(
    search: Search,
    cal: Calibration,
    hp: Config,
    final_top: int,
    final_rounds: int,
    trials_path: Path,
    say: Callable[[str], None],
) -> list[dict]:
    """Re-measure the best few and the hand-picked default, interleaved against ar."""
    cands = [c for _, c in search.ranked()[:final_top]]
    if hp.key() not in {c.key() for c in cands}:
        cands.append(hp)
    final = remeasure(cal, cands, final_rounds, search.rng)
    for f in final:
        said = statistics.mean(search.scores.get(f["key"], [float("nan")]))
        say(
            f"final {f['speedup']:.3f}x tau {f['tau']:.2f} (search {said:.3f}x)"
            f"{' [hand-picked]' if f['key'] == hp.key() else ''} | {f['config'].describe()}"
        )
        append_row(
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
    return final


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
        model = load(str(model), precision=precision)
    ident = model_identity(model)
    n_layers = ident["n_layers"]
    prec = ident["precision"] or precision
    out = Path(out) if out else profiles_home() / file_name(model.name, prec)
    trials_path = trials_path_for(out)

    qpath, qs, ids = _calibration_prompts(model, calib, prompts, max_new_tokens)
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
        "questions_file": recorded_path(str(qpath)),
        "max_new_tokens": max_new_tokens,
        "search_exit": search_exit,
    }
    past = read_trials(trials_path, header)
    if not past:
        start_trials(trials_path, header)
    else:
        log(f"resuming: {len(past)} trials already in {trials_path}")

    # warm-up, then plain-decoding references on every prompt
    hp = hand_picked(model)
    cal.run(0, None)
    cal.run(0, drafter_for(hp))
    for i in range(len(ids)):
        cal.run_ar(i)
    ar_total = sum(cal.ar_ref(i) for i in range(len(ids)))
    log(
        f"plain decoding: {sum(map(len, cal.ar_ids))} tokens in {ar_total:.1f} s "
        f"({sum(map(len, cal.ar_ids)) / ar_total:.1f} tokens/s, decode only)"
    )

    existing = None
    try:
        existing = profile_for(model)
    except VeridraftError as e:
        log(f"note: the current profile is not usable ({e}); not probing it")
    search = Search(space, _optimizer(space, seed), random.Random(seed + len(past)), list(past))
    for t in past:
        c = Config(tuple(t["attn"]), tuple(t["mlp"]), float(t["gamma0"]), int(t["num_tokens"]))
        search.remember(c, t["x"], t["speedup"])
    probes = [
        c for c in probe_configs(model, existing, search_exit) if c.key() not in search.scores
    ]
    stopped, n_new, say = _run_trials(
        search,
        cal,
        probes,
        iters=iters,
        time_budget=time_budget,
        t_start=t_start,
        per_trial=ar_total * (1 + baseline_prompts / len(ids)),  # rough, refined as we go
        final_cost=final_rounds * (final_top + 2) * ar_total,
        baseline_prompts=baseline_prompts,
        trials_path=trials_path,
        progress=progress,
        log=log,
    )
    trials = search.trials
    if not search.scores:
        raise VeridraftError("tune: no trial ran (time budget too small?)")
    log(f"search stopped ({stopped}): {len(trials)} trials ({n_new} new)")

    final = _final(search, cal, hp, final_top, final_rounds, trials_path, say)
    win = max(final, key=lambda f: f["speedup"])
    hand = next(f for f in final if f["key"] == hp.key())
    wc: Config = win["config"]
    prof = build_profile(
        model_name=model.name,
        ident=ident,
        precision=prec,
        win=win,
        hand=hand,
        scores=search.scores,
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
            "questions_file": recorded_path(str(qpath)),
            "questions": [q.question_id for q in qs],
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "trials_file": str(trials_path),
            "is_hand_picked": win["key"] == hp.key(),
        },
        n_prompts=len(ids),
        max_new_tokens=max_new_tokens,
        final_rounds=final_rounds,
        command=command or "",
    )
    path = write_profile(prof, out, win, hand, log)
    return TuneResult(prof, path, trials_path, trials, final)
