"""Metrics (per method, per task group): tokens/s as the mean of per-question rates (Spec-Bench;
per question: sum of tokens over turns / sum of times) and as total tokens / total time; speedup =
mean rate / mean rate of the method's own plain decoding (`ar` for veridraft methods, `hf:ar` for
transformers ones, ...); tau = tokens committed per target forward, bonus token included
(plain decoding = 1.00); alpha = accepted / drafted; acceptance per draft position; prefill and
decode time; peak RSS; exact match of output ids vs veridraft's `ar`.
"""

from __future__ import annotations

import statistics

from .questions import OVERALL, SPEC_BENCH_GROUPS


def mean_of(xs) -> float | None:
    """Mean of the values that are not None (None when there are none)."""
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
        "prefill_s": mean_of(r.get("prefill_s") for r in recs),
        "decode_s": mean_of(r.get("decode_s") for r in recs),
        "wall_s": mean_of(r["wall_s"] for r in recs),
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
    order = [g for g in SPEC_BENCH_GROUPS if g in present_groups]
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
