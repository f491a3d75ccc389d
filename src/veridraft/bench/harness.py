"""Spec-Bench-protocol harness: methods interleaved per question, metrics per task group.

Protocol (DESIGN.md "Measuring", Spec-Bench):
- batch size 1; warm-up runs first (every method, on the first question);
- for each question, every method runs back to back (the conversation of a multi-turn question
  included: turn 2 sees the same method's turn-1 answer); the order rotates by one method per
  question and per repeat, so no method always goes first;
- every method gets the same prompt ids, built by veridraft's tokenizer outside the timed region;
  the timed region is the generation call only (prefill + decode);
- tokens are the generated ids of every method (never re-tokenized text).

Metrics (per method, per task group): tokens/s as the mean of per-question rates (Spec-Bench;
per question: sum of tokens over turns / sum of times) and as total tokens / total time; speedup =
mean rate / mean rate of the method's own plain decoding (`ar` for veridraft methods, `hf:ar` for
transformers ones, ...); tau = tokens committed per target forward, bonus token included
(plain decoding = 1.00); alpha = accepted / drafted; acceptance per draft position; prefill and
decode time; peak RSS; exact match of output ids vs veridraft's `ar`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VeridraftError
from .questions import (
    OVERALL,
    Question,
    default_questions_path,
    load_questions,
    select,
)

DEFAULT_METHODS = "ar,ngram,layerskip,hf:ar,hf:pld"
# Environment variables that change CPU threading, recorded with every run.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


# --------------------------------------------------------------------------------------------
# methods


@dataclass
class RunOutput:
    """What one generation call returns to the harness."""

    ids: list[int]
    wall_s: float  # the timed region: the generation call, prefill + decode
    prefill_s: float | None = None  # prefill + first token (time to first token for peers)
    stats: dict | None = None  # veridraft Stats.to_dict(); None for peers
    steps: int | None = None  # peers: generation steps seen (target forwards incl. prefill)
    finish_reason: str | None = None


class Method:
    """One benchmarked method. Subclasses implement `run` (and `prepare` to load things once)."""

    engine = "veridraft"

    def __init__(self, name: str) -> None:
        self.name = name
        self.baseline = "ar"  # the plain decoding this method's speedup is measured against
        self.lossless = True
        self.skip_reason: str | None = None

    def prepare(self) -> None:
        """Load what the method needs (outside any timing); set skip_reason to skip it."""

    def run(
        self, prompt_ids: list[int], *, max_new_tokens: int, temperature: float, seed: int
    ) -> RunOutput:
        raise NotImplementedError

    def info(self) -> dict:
        return {
            "engine": self.engine,
            "baseline": self.baseline,
            "lossless": self.lossless,
            "skipped": self.skip_reason,
        }


class VeridraftMethod(Method):
    """`ar` (plain decoding) or any drafter spec (`ngram:num_tokens=8`, `layerskip`, ...)."""

    def __init__(self, spec: str, model) -> None:
        super().__init__(spec)
        self.model = model
        self.draft = None if spec == "ar" else spec

    def _drafter(self):
        if self.draft is None:
            return None
        from ..drafters import make_drafter

        return make_drafter(self.draft, self.model)

    def prepare(self) -> None:
        d = self._drafter()  # fails early on a bad spec
        self.lossless = not bool(getattr(d, "lossy", False))

    def run(self, prompt_ids, *, max_new_tokens, temperature, seed) -> RunOutput:
        import torch

        from ..decode import decode
        from ..sampling import SamplingParams

        model = self.model
        ctx = getattr(model, "context_length", None)
        if ctx is not None and len(prompt_ids) + max_new_tokens > ctx:
            raise VeridraftError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) "
                f"exceeds the context length ({ctx})"
            )
        drafter = self._drafter()  # like generate(): a fresh drafter per call, untimed
        generator = torch.Generator().manual_seed(seed)
        sampling = SamplingParams(temperature=temperature)
        tok = model.tokenizer
        t0 = time.perf_counter()
        new, stats = decode(
            model.net,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            generator=generator,
            drafter=drafter,
            eos_ids=tok.eos_ids,
            tokenizer=tok,
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


PEER_ENGINES = ("hf", "llamacpp")


def _known_method_names() -> set[str]:
    names = {"ar", *PEER_ENGINES}
    try:
        from ..drafters import DRAFTERS

        names.update(DRAFTERS)
    except ImportError:  # pragma: no cover - drafters are part of the package
        pass
    return names


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
            head = p.split(":", 1)[0].strip().lower()
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
    if spec.startswith(("hf:", "llamacpp:")):
        from .peers import make_peer

        return make_peer(spec, model, threads=threads)
    return VeridraftMethod(spec, model)


# --------------------------------------------------------------------------------------------
# protocol


def rotated(methods: Sequence, k: int) -> list:
    """methods rotated left by k (k taken modulo the length)."""
    if not methods:
        return []
    k %= len(methods)
    return list(methods[k:]) + list(methods[:k])


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb(reset_ok: bool) -> float:
    """Peak RSS since the last reset (Linux VmHWM), else the current RSS (psutil), in MB."""
    if reset_ok:
        try:
            with open("/proc/self/status") as f:
                m = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
            if m:
                return int(m.group(1)) / 1024
        except OSError:
            pass
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _run_seed(seed: int, repeat: int, qi: int, turn: int) -> int:
    return (seed * 1_000_003 + repeat * 10_007 + qi * 101 + turn) % 2**31


@dataclass
class Protocol:
    max_new_tokens: int = 256
    temperature: float = 0.0
    repeats: int = 1
    warmup: int = 1
    seed: int = 0
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr))
    on_record: Callable[[dict], None] | None = None  # e.g. append to a partial-results file


def run_protocol(
    questions: list[Question],
    methods: list[Method],
    encode: Callable[[list[dict]], list[int]],
    decode_text: Callable[[list[int]], str],
    protocol: Protocol,
) -> list[dict]:
    """Run every (repeat, question, method, turn); return one record per generated turn.

    encode(messages) builds prompt ids (chat template, or raw text for base models);
    decode_text(ids) gives the answer text that enters the next turn's messages.
    """
    p = protocol
    for m in methods:
        if m.skip_reason is None:
            try:
                m.prepare()
            except ImportError as e:
                m.skip_reason = f"{type(e).__name__}: {e}"
        if m.skip_reason:
            p.log(f"skipping method {m.name}: {m.skip_reason}")
    active = [m for m in methods if not m.skip_reason]
    if not active:
        raise VeridraftError("no method can run (all were skipped)")
    if not questions:
        raise VeridraftError("no questions selected")

    first_ids = encode([{"role": "user", "content": questions[0].turns[0]}])
    if p.warmup:
        p.log(
            f"warm-up: {p.warmup} run(s) of each method on question {questions[0].question_id} "
            f"({len(first_ids)} prompt tokens)"
        )
    for w in range(p.warmup):
        for m in rotated(active, w):
            m.run(
                first_ids,
                max_new_tokens=p.max_new_tokens,
                temperature=p.temperature,
                seed=_run_seed(p.seed, -1, 0, w),
            )

    # Everything loaded so far (models, transformers' module graph) is long-lived: freeze it so
    # the collection before each run only walks what the runs themselves allocate.
    gc.collect()
    gc.freeze()
    total = p.repeats * sum(len(q.turns) for q in questions) * len(active)
    bar = None
    if p.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, file=sys.stderr, unit="gen", dynamic_ncols=True, leave=True)
    reset_ok = _peak_rss_reset()
    records: list[dict] = []
    try:
        for r in range(p.repeats):
            for qi, q in enumerate(questions):
                for pos, m in enumerate(rotated(active, qi + r)):
                    messages: list[dict] = []
                    for turn, content in enumerate(q.turns):
                        if bar is not None:
                            bar.set_description(
                                f"rep {r + 1}/{p.repeats} q {qi + 1}/{len(questions)} "
                                f"(id {q.question_id}) {m.name}",
                                refresh=True,
                            )
                        messages.append({"role": "user", "content": content})
                        rec = _one_run(
                            m, q, messages, r, qi, turn, pos, encode, decode_text, p, reset_ok
                        )
                        records.append(rec)
                        if p.on_record is not None:
                            p.on_record(rec)
                        if bar is not None:
                            bar.update(1)
                        if rec.get("error"):
                            msg = f"{m.name} failed on question {q.question_id}: {rec['error']}"
                            (bar.write if bar is not None else p.log)(msg)
                            if bar is not None:
                                bar.update(len(q.turns) - turn - 1)
                            break
                        messages.append({"role": "assistant", "content": rec["text"]})
    finally:
        if bar is not None:
            bar.close()
        gc.unfreeze()
    return records


def _one_run(m, q, messages, r, qi, turn, pos, encode, decode_text, p, reset_ok) -> dict:
    rec = {
        "method": m.name,
        "repeat": r,
        "question_id": q.question_id,
        "category": q.category,
        "group": q.group,
        "turn": turn,
        "order": pos,
    }
    try:
        ids = encode(list(messages))
        rec["prompt_tokens"] = len(ids)
        gc.collect()
        if reset_ok:
            _peak_rss_reset()
        out = m.run(
            ids,
            max_new_tokens=p.max_new_tokens,
            temperature=p.temperature,
            seed=_run_seed(p.seed, r, qi, turn),
        )
    except (VeridraftError, ValueError, RuntimeError) as e:
        rec["error"] = f"{type(e).__name__}: {e}"
        return rec
    rec["peak_rss_mb"] = _peak_rss_mb(reset_ok)
    rec["time"] = round(time.time(), 3)  # when it ended (unix time)
    load = _loadavg()
    rec["load_1min"] = load[0] if load else None  # CPU contention around this run
    n = len(out.ids)
    rec.update(
        ids=list(out.ids),
        text=decode_text(list(out.ids)),
        new_tokens=n,
        wall_s=out.wall_s,
        prefill_s=out.prefill_s,
        decode_s=None if out.prefill_s is None else out.wall_s - out.prefill_s,
        tokens_per_s=n / out.wall_s if out.wall_s > 0 else None,
        finish_reason=out.finish_reason,
        steps=out.steps,
        stats=out.stats,
    )
    return rec


# --------------------------------------------------------------------------------------------
# metrics


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def per_question_rates(recs: list[dict]) -> dict:
    """{(question_id): tokens/s} with tokens and time summed over the question's turns."""
    tok: dict = {}
    sec: dict = {}
    for rec in recs:
        k = rec["question_id"]
        tok[k] = tok.get(k, 0) + rec["new_tokens"]
        sec[k] = sec.get(k, 0.0) + rec["wall_s"]
    return {k: tok[k] / sec[k] for k in tok if sec[k] > 0}


def tau_of(recs: list[dict]) -> float | None:
    """Tokens committed per target forward, bonus token included, pooled over all rounds.

    veridraft: sum(emitted_in_rounds) / sum(target_forwards) (prefill excluded; plain = 1.00).
    Peers: generated tokens / generation steps seen by the streamer (first step = prefill).
    """
    emitted = forwards = 0
    for rec in recs:
        s = rec.get("stats")
        if s is not None:
            if s.get("target_forwards"):
                emitted += s.get("emitted_in_rounds", 0)
                forwards += s["target_forwards"]
        elif rec.get("steps"):
            emitted += rec["new_tokens"]
            forwards += rec["steps"]
        else:
            return None
    return emitted / forwards if forwards else None


def alpha_of(recs: list[dict]) -> float | None:
    """Accepted draft tokens / drafted tokens, pooled (None without drafting or stats)."""
    if any(rec.get("stats") is None for rec in recs):
        return None
    drafted = sum(rec["stats"].get("drafted", 0) for rec in recs)
    accepted = sum(rec["stats"].get("accepted", 0) for rec in recs)
    return accepted / drafted if drafted else None


def acceptance_per_pos_of(recs: list[dict]) -> list[float] | None:
    """Per draft position i: sum(accepted_per_pos[i]) / sum(drafted_per_pos[i])."""
    d: list[int] = []
    a: list[int] = []
    for rec in recs:
        s = rec.get("stats")
        if s is None:
            return None
        for i, (di, ai) in enumerate(
            zip(s.get("drafted_per_pos", []), s.get("accepted_per_pos", []))
        ):
            if i >= len(d):
                d.append(0)
                a.append(0)
            d[i] += di
            a[i] += ai
    return [ai / di if di else 0.0 for ai, di in zip(a, d)] if d else None


def basic_metrics(recs: list[dict]) -> dict:
    """Metrics of one method over one set of records (one repeat, one group)."""
    rates = per_question_rates(recs)
    tokens = sum(r["new_tokens"] for r in recs)
    secs = sum(r["wall_s"] for r in recs)
    return {
        "questions": len(rates),
        "generations": len(recs),
        "new_tokens": tokens,
        "tok_s_mean": statistics.fmean(rates.values()) if rates else None,
        "tok_s_total": tokens / secs if secs > 0 else None,
        "tau": tau_of(recs),
        "alpha": alpha_of(recs),
        "prefill_s": _mean(r.get("prefill_s") for r in recs),
        "decode_s": _mean(r.get("decode_s") for r in recs),
        "wall_s": _mean(r["wall_s"] for r in recs),
    }


def exact_match(recs: list[dict], ref: list[dict]) -> dict:
    """Per question (all turns): ids equal to the reference's for the same repeat."""
    ref_ids = {(r["repeat"], r["question_id"], r["turn"]): r.get("ids") for r in ref}
    by_q: dict = {}
    for rec in recs:
        by_q.setdefault((rec["repeat"], rec["question_id"]), []).append(rec)
    matched = compared = 0
    first = None
    for (rep, qid), rs in by_q.items():
        ok = True
        have_ref = True
        for rec in sorted(rs, key=lambda x: x["turn"]):
            want = ref_ids.get((rep, qid, rec["turn"]))
            got = rec.get("ids")
            if want is None or got is None:
                have_ref = False
                break
            if got != want:
                ok = False
                if first is None:
                    k = next(
                        (i for i, (x, y) in enumerate(zip(got, want)) if x != y),
                        min(len(got), len(want)),
                    )
                    first = {
                        "question_id": qid,
                        "repeat": rep,
                        "turn": rec["turn"],
                        "token_index": k,
                        "category": rec["category"],
                    }
                break
        if not have_ref:
            continue
        compared += 1
        matched += ok
    return {
        "exact_match": matched / compared if compared else None,
        "exact_matched": matched,
        "exact_compared": compared,
        "first_mismatch": first,
    }


def _mean_std(values: list) -> tuple:
    xs = [v for v in values if v is not None]
    if not xs:
        return None, None
    if len(xs) == 1:
        return xs[0], None
    return statistics.fmean(xs), statistics.stdev(xs)


METRIC_KEYS = (
    "tok_s_mean",
    "tok_s_total",
    "speedup",
    "vs_ar",
    "tau",
    "alpha",
    "prefill_s",
    "decode_s",
    "wall_s",
)


def summarize(records: list[dict], methods: dict[str, dict], reference: str = "ar") -> dict:
    """Metrics per task group (and `overall`) per method; mean and std over repeats.

    methods: name -> info (engine, baseline, lossless, skipped), in run order.
    """
    ok = [r for r in records if not r.get("error")]
    present_groups = []
    for r in records:
        if r["group"] not in present_groups:
            present_groups.append(r["group"])
    order = [
        g
        for g in ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
        if g in present_groups
    ]
    groups = order + [g for g in present_groups if g not in order] + [OVERALL]
    repeats = sorted({r["repeat"] for r in records}) or [0]
    table: dict = {}
    for g in groups:
        in_g = ok if g == OVERALL else [r for r in ok if r["group"] == g]
        per_rep: dict = {}
        for rep in repeats:
            per_rep[rep] = {
                name: basic_metrics([r for r in in_g if r["method"] == name and r["repeat"] == rep])
                for name in methods
            }
        table[g] = {}
        for name, info in methods.items():
            if info.get("skipped"):
                table[g][name] = {"skipped": info["skipped"]}
                continue
            rows = []
            for rep in repeats:
                m = dict(per_rep[rep][name])
                base = per_rep[rep].get(info.get("baseline") or "", {}).get("tok_s_mean")
                ref = per_rep[rep].get(reference, {}).get("tok_s_mean")
                mine = m["tok_s_mean"]
                m["speedup"] = mine / base if mine is not None and base else None
                m["vs_ar"] = mine / ref if mine is not None and ref else None
                rows.append(m)
            entry: dict = {}
            for k in METRIC_KEYS:
                entry[k], entry[k + "_std"] = _mean_std([row[k] for row in rows])
            mine_recs = [r for r in in_g if r["method"] == name]
            entry["questions"] = rows[0]["questions"]
            entry["new_tokens"] = sum(row["new_tokens"] for row in rows)
            entry["acceptance_per_pos"] = acceptance_per_pos_of(mine_recs) if mine_recs else None
            rss = [r.get("peak_rss_mb") for r in mine_recs if r.get("peak_rss_mb") is not None]
            entry["peak_rss_mb"] = max(rss) if rss else None
            entry["errors"] = sum(
                1
                for r in records
                if r["method"] == name and r.get("error") and (g == OVERALL or r["group"] == g)
            )
            if name != reference and reference in methods:
                ref_recs = [r for r in in_g if r["method"] == reference]
                entry.update(exact_match(mine_recs, ref_recs))
            else:
                entry.update(
                    exact_match=None, exact_matched=None, exact_compared=None, first_mismatch=None
                )
            entry["lossless"] = info.get("lossless", True)
            table[g][name] = entry
    return {
        "groups": groups,
        "methods": list(methods),
        "reference": reference,
        "repeats": len(repeats),
        "table": table,
    }


# --------------------------------------------------------------------------------------------
# environment


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def environment(threads: int, command: str | None = None) -> dict:
    import datetime
    import platform

    import torch

    try:
        import transformers

        tv = transformers.__version__
    except ImportError:
        tv = None
    try:
        from importlib.metadata import version

        vv = version("veridraft")
    except Exception:
        from .. import __version__ as vv
    try:
        import llama_cpp

        lv = getattr(llama_cpp, "__version__", "?")
    except ImportError:
        lv = None

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command if command is not None else command_line(),
        "veridraft": vv,
        "torch": torch.__version__,
        "transformers": tv,
        "llama_cpp_python": lv,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "load_average": _loadavg(),
        "env_vars": {k: os.environ[k] for k in THREAD_ENV_VARS if k in os.environ},
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: `veridraft bench ...` or `python -m ...`."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else ""
    if prog == "veridraft":
        head = ["veridraft"]
    elif prog == "__main__.py":
        mod = Path(argv[0]).parent.name
        head = ["python", "-m", "veridraft.bench" if mod == "bench" else f"veridraft.{mod}"]
    else:
        head = [prog] if prog else []
    env = [f"{k}={os.environ[k]}" for k in THREAD_ENV_VARS if k in os.environ]
    return shlex.join(env + head + argv[1:])


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes competing for the cores skew timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------
# the whole run


def default_out_dir(model_name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(str(model_name)).name or "model")
    return Path("out") / f"bench-{safe}-{stamp}"


def run_bench(
    model,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    questions: str | Path | None = None,
    *,
    limit: int | None = None,
    groups: Sequence[str] | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    repeats: int = 1,
    warmup: int = 1,
    out: str | Path | None = None,
    threads: int = 2,
    seed: int = 0,
    progress: bool = True,
    bandwidth: bool = True,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    precision: str = "fp32",
) -> dict:
    """Benchmark `methods` on `model` (a catalog name, path, or a loaded model); write
    results.json, report.md and speedup.png into `out` (None: no files). Returns the results."""
    import torch

    log = log or (lambda s: print(s, file=sys.stderr))
    if repeats < 1:
        raise VeridraftError(f"--repeats must be at least 1, got {repeats}")
    if warmup < 0:
        raise VeridraftError(f"--warmup must be >= 0, got {warmup}")
    if max_new_tokens < 1:
        raise VeridraftError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if threads < 1:
        raise VeridraftError(f"--threads must be at least 1, got {threads}")
    names = split_methods(methods)
    if "ar" not in names and any(not n.startswith(("hf:", "llamacpp:")) for n in names):
        log("adding method 'ar' (veridraft plain decoding): speedups and exact match need it")
        names.insert(0, "ar")
    qpath = Path(questions) if questions else default_questions_path()
    all_q = load_questions(qpath)
    chosen = select(all_q, list(groups) if groups else None, limit)

    torch.set_num_threads(threads)
    if isinstance(model, str | Path):
        import veridraft

        model = veridraft.load(str(model), precision=precision)
    meths = [make_method(n, model, threads=threads) for n in names]

    from ..generate import prompt_ids_for

    tok = model.tokenizer
    prot = Protocol(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        repeats=repeats,
        warmup=warmup,
        seed=seed,
        progress=progress,
        log=log,
    )
    n_gen = repeats * sum(len(q.turns) for q in chosen)
    log(
        f"benchmark: {model.name}, {len(chosen)} questions ({n_gen} generations per method) "
        f"from {qpath}, methods {', '.join(names)}, {max_new_tokens} new tokens max, "
        f"{threads} threads"
    )
    load_start = _loadavg()
    ncpu = os.cpu_count() or 1
    if load_start and load_start[0] > max(1.0, ncpu - threads + 0.5):
        log(
            f"warning: load average {load_start[0]:.1f} on {ncpu} CPUs: other processes are "
            "competing for the cores, so absolute timings will be slow and noisy (interleaving "
            "keeps the ratios comparable, but a quiet machine gives better figures)"
        )
    partial = None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        partial = Path(out) / "records.partial.jsonl"
        partial.write_text("")
        log(f"records are appended to {partial} as they come")

        def save(rec: dict, path=partial) -> None:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

        prot.on_record = save
    t_start = time.perf_counter()
    records = run_protocol(
        chosen,
        meths,
        encode=lambda msgs: prompt_ids_for(model, msgs),
        decode_text=lambda ids: tok.decode(ids, skip_special_tokens=True),
        protocol=prot,
    )
    elapsed = time.perf_counter() - t_start
    info = {m.name: m.info() for m in meths}
    summary = summarize(records, info)
    env = environment(threads, command)
    env["load_average_start"] = load_start
    bound = None
    if bandwidth:
        from .ar_speed import bandwidth_bound

        ok = [r for r in records if r["method"] == "ar" and not r.get("error")]
        ctx = _mean(r["prompt_tokens"] + r["new_tokens"] / 2 for r in ok) or max_new_tokens
        bound = bandwidth_bound(model.net, ctx)
    results = {
        "format": "veridraft-bench/1",
        "model": {
            "name": model.name,
            "path": str(getattr(model, "path", "")),
            "precision": getattr(model, "precision", None),
        },
        "settings": {
            "questions_file": str(qpath),
            "questions": len(chosen),
            "question_ids": [q.question_id for q in chosen],
            "limit": limit,
            "groups": list(groups) if groups else None,
            "methods": names,
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "repeats": repeats,
            "warmup": warmup,
            "seed": seed,
            "threads": threads,
            "elapsed_s": elapsed,
        },
        "environment": env,
        "bandwidth_bound": bound,
        "methods": info,
        "summary": summary,
        "records": records,
    }
    if out is not None:
        from .report import write_all

        results["files"] = write_all(results, Path(out))
        if partial is not None:
            partial.unlink(missing_ok=True)
    return results


# --------------------------------------------------------------------------------------------
# CLI


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (and `bench compare A.json B.json`) to a CLI's subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark methods on Spec-Bench-format questions (Spec-Bench protocol)",
        description=(
            "Run methods interleaved per question on Spec-Bench-format questions and write "
            "results.json, report.md and speedup.png. `veridraft bench compare A.json B.json` "
            "prints the change between two runs."
        ),
    )
    add_bench_arguments(p)
    p.set_defaults(func=run_bench_cli)
    sub = p.add_subparsers(dest="bench_cmd", metavar="{compare,report}")
    c = sub.add_parser("compare", help="per-method change between two results.json files")
    c.add_argument("a", metavar="A.json", help="results.json of the first (old) run, or its dir")
    c.add_argument("b", metavar="B.json", help="results.json of the second (new) run, or its dir")
    c.add_argument(
        "--group", default=None, help="task group to compare (default: every group, overall first)"
    )
    r = sub.add_parser(
        "report", help="rewrite report.md and speedup.png from a results.json (no new runs)"
    )
    r.add_argument("results", metavar="RESULTS.json", help="results.json, or its directory")
    r.add_argument("--out", default=None, metavar="DIR", help="default: next to results.json")
    return p


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="catalog name, HF folder or GGUF file (default smollm2-135m)",
    )
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help="comma-separated methods: ar, drafter specs (ngram, ngram:num_tokens=8,max_ngram=3, "
        "layerskip, model:NAME), peers hf:ar, hf:pld, hf:assisted:DRAFT, llamacpp:ar, "
        f"llamacpp:pld (default {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--questions",
        default=None,
        metavar="FILE",
        help="Spec-Bench-format JSONL (default ../shared/data/spec_bench_dev.jsonl)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="N questions per task group, picked evenly across the file",
    )
    p.add_argument(
        "--groups",
        default=None,
        help="comma-separated task groups (mt_bench, translation, summarization, qa, "
        "math_reasoning, rag; or any category of the file); default all",
    )
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        metavar="R",
        help="repeat the whole run R times; report mean ± std over repeats",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        metavar="W",
        help="warm-up runs of every method before timing (default 1)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="output directory (default out/bench-<model>-<timestamp>)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument(
        "--precision",
        default="fp32",
        help="veridraft's precision mode: fp32 (default), fp16w, bf16 (approximations of fp32; "
        "peers always run their own float32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_bench_cli(args: argparse.Namespace) -> int:
    """Run `veridraft bench ...` from parsed arguments; returns the exit code."""
    if getattr(args, "bench_cmd", None) == "compare":
        from .report import compare_files

        print(compare_files(args.a, args.b, group=args.group))
        return 0
    if getattr(args, "bench_cmd", None) == "report":
        from .report import rewrite_report

        for kind, path in rewrite_report(args.results, args.out).items():
            print(f"{kind}: {path}")
        return 0
    out = Path(args.out) if args.out else default_out_dir(args.model)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else None
    results = run_bench(
        args.model,
        args.methods,
        args.questions,
        limit=args.limit,
        groups=groups,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        warmup=args.warmup,
        out=out,
        threads=args.threads,
        seed=args.seed,
        progress=not args.no_progress,
        precision=args.precision,
    )
    from .report import overview_text

    print(overview_text(results))
    for kind, path in results.get("files", {}).items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m veridraft.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_bench_cli(args)
    except VeridraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
