"""Fidelity of a lossy configuration (loose verification, a compressed KV cache, ...) to the
full model's greedy output: how much of what the model would have said it still says.

Per generation, against the reference's ids for the same (repeat, question, turn):
- token agreement: positions where both sequences have the same token, divided by the longer
  length (a shorter or longer answer counts its missing positions as different);
- first divergence: the first position where they differ (the shorter length when one is a
  prefix of the other; None when equal);
- exact match: the ids are equal.
Over a set: the mean token agreement, the pooled one (all equal positions / all positions), the
exact-match rate, and the mean and median first divergence of the generations that diverge.

    fidelity(records_of_method, records_of_reference)      # records as in results.json
    add_fidelity(summary, records, reference="ar")         # into every summary table entry
    fidelity_markdown(results)                             # the report's section
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from .questions import OVERALL


def token_agreement(ids: Sequence[int], ref: Sequence[int]) -> float:
    """Equal positions / the longer length (1.0 for two empty sequences)."""
    n = max(len(ids), len(ref))
    if n == 0:
        return 1.0
    return sum(1 for a, b in zip(ids, ref) if a == b) / n


def first_divergence(ids: Sequence[int], ref: Sequence[int]) -> int | None:
    """The first position where the sequences differ; None when they are equal."""
    for i, (a, b) in enumerate(zip(ids, ref)):
        if a != b:
            return i
    return None if len(ids) == len(ref) else min(len(ids), len(ref))


def _key(rec: dict) -> tuple:
    return rec.get("repeat", 0), rec["question_id"], rec.get("turn", 0)


def fidelity(records: Sequence[dict], reference: Sequence[dict]) -> dict:
    """Fidelity of `records` (one method) to `reference` (the full model's greedy output)."""
    ref = {_key(r): r["ids"] for r in reference if r.get("ids") is not None}
    agree: list[float] = []
    div: list[int] = []
    equal_pos = total_pos = exact = 0
    for rec in records:
        want = ref.get(_key(rec))
        got = rec.get("ids")
        if want is None or got is None:
            continue
        agree.append(token_agreement(got, want))
        equal_pos += sum(1 for a, b in zip(got, want) if a == b)
        total_pos += max(len(got), len(want))
        d = first_divergence(got, want)
        if d is None:
            exact += 1
        else:
            div.append(d)
    n = len(agree)
    return {
        "compared": n,
        "token_agreement": statistics.fmean(agree) if n else None,
        "token_agreement_pooled": equal_pos / total_pos if total_pos else None,
        "exact_match_rate": exact / n if n else None,
        "diverged": len(div),
        "first_divergence_mean": statistics.fmean(div) if div else None,
        "first_divergence_median": statistics.median(div) if div else None,
    }


def add_fidelity(
    summary: dict,
    records: Sequence[dict],
    reference: str = "ar",
    score: Callable[[dict], float | None] | None = None,
) -> dict:
    """Put `fidelity` (vs `reference`) and, with `score(record) -> float`, `accuracy` (mean
    task score, e.g. the retrieval set's) into every entry of the summary's tables."""
    ok = [r for r in records if not r.get("error")]
    for g, table in summary["table"].items():
        in_g = ok if g == OVERALL else [r for r in ok if r.get("group") == g]
        ref = [r for r in in_g if r["method"] == reference]
        for name, entry in table.items():
            if entry.get("skipped"):
                continue
            mine = [r for r in in_g if r["method"] == name]
            entry["fidelity"] = fidelity(mine, ref) if ref and name != reference else None
            if score is not None:
                scores = [s for s in (score(r) for r in mine) if s is not None]
                entry["accuracy"] = statistics.fmean(scores) if scores else None
    summary["fidelity_reference"] = reference
    return summary


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def fidelity_markdown(results: dict) -> list[str]:
    """The report's fidelity section (lines), empty when the run has no fidelity figures."""
    summary = results["summary"]
    overall = summary["table"].get(OVERALL, {})
    if not any(e.get("fidelity") or e.get("accuracy") is not None for e in overall.values()):
        return []
    ref = summary.get("fidelity_reference", "ar")
    has_acc = any(e.get("accuracy") is not None for e in overall.values())
    lines = [
        "## Fidelity",
        "",
        f"Agreement of each method's generated ids with `{ref}` (the full model, greedy): "
        "*token agreement* = equal positions / the longer answer's length, mean over "
        "generations; *exact* = share of generations with equal ids; *first divergence* = the "
        "first differing position, mean and median over the generations that differ. Lossy "
        "methods are marked **lossy**."
        + (" *Accuracy* is the task score (retrieval: exact value match)." if has_acc else ""),
        "",
        "| method | lossless | speedup vs ar | token agreement | exact | diverged | first "
        "divergence (mean / median)" + (" | accuracy |" if has_acc else " |"),
        "|---|---|--:|--:|--:|--:|--:|" + ("--:|" if has_acc else ""),
    ]
    for name, e in overall.items():
        if e.get("skipped"):
            row = f"| `{name}` | – | skipped: {e['skipped']} | | | | |" + (" |" if has_acc else "")
            lines.append(row)
            continue
        f = e.get("fidelity") or {}
        lossless = "yes" if e.get("lossless", True) else "**lossy**"
        cells = [
            f"`{name}`",
            lossless,
            "–" if e.get("vs_ar") is None else f"{e['vs_ar']:.2f}x",
            _pct(f.get("token_agreement")) if f else ("reference" if name == ref else "–"),
            _pct(f.get("exact_match_rate")) if f else "–",
            f"{f.get('diverged')}/{f.get('compared')}" if f else "–",
            f"{_num(f.get('first_divergence_mean'))} / {_num(f.get('first_divergence_median'))}"
            if f
            else "–",
        ]
        if has_acc:
            cells.append(_pct(e.get("accuracy")))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines
