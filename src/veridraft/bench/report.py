"""Benchmark outputs: results.json, report.md, speedup.png, and `compare` of two runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import VeridraftError
from .fidelity import fidelity_markdown
from .long import long_table
from .metrics import summarize
from .questions import OVERALL

HOW_TO_READ = (
    "**How to read this.** Every method ran on the same questions with the same prompt ids, "
    "batch size 1, interleaved per question (all methods back to back, order rotated), after "
    "warm-up, in one process. *tok/s (mean)* is the Spec-Bench figure: per question, generated "
    "tokens / generation time (turns summed), averaged over questions; *tok/s (total)* is all "
    "tokens / all time, which weighs long answers more. *Speedup* is the mean rate divided by "
    "the mean rate of the method's own plain decoding (`ar` for veridraft, `hf:ar` for "
    "transformers, `llamacpp:ar` for llama.cpp); *vs ar* divides by veridraft's `ar` instead, so "
    "peers' absolute speed sits next to ours. *τ* is tokens committed per target forward with "
    "the bonus token counted (plain decoding = 1.00; for transformers: generated tokens per "
    "generation step, prefill step included); *α* is accepted / drafted tokens. *Exact match* "
    "is the share of questions (all turns) whose generated ids equal veridraft `ar`'s: a "
    "lossless method must be at 100% under greedy decoding; peers use their own numerics, so "
    "for them it shows whether they reproduce our float32 greedy output. Lossy methods are "
    "marked **lossy**; their exact match is an agreement rate. Times are wall-clock on a shared "
    "CPU: compare ratios within this run rather than absolute figures across machines."
)


# --------------------------------------------------------------------------------------------
# formatting


def _f(x, digits=2, std=None, pct=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if pct:
        s = f"{100 * x:.0f}%"
    else:
        s = f"{x:.{digits}f}"
    if std is not None:
        s += f" ± {100 * std:.0f}%" if pct else f" ± {std:.{digits}f}"
    return s


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _mb(nbytes: float) -> str:
    mb = nbytes / 1e6
    return f"{mb:.0f} MB" if mb >= 100 else f"{mb:.1f} MB" if mb >= 1 else f"{mb:.3f} MB"


def _duration(secs: float) -> str:
    if secs < 90:
        return f"{secs:.0f} s"
    if secs < 5400:
        return f"{secs / 60:.1f} min"
    return f"{secs / 3600:.1f} h"


def _load_warning(env: dict, s: dict, records: list[dict]) -> list[str]:
    """A note when other processes were competing for the CPU during the run. The run's own
    threads count in the load average (a 2-thread run alone on 2 CPUs reads ~2), so only load
    beyond them means competition."""
    loads = [r["load_1min"] for r in records if r.get("load_1min") is not None]
    loads += [x[0] for x in (env.get("load_average_start"), env.get("load_average")) if x]
    ncpu = env.get("cpu_count") or 1
    threads = s.get("threads") or 1
    worst = max(loads, default=0.0)
    if worst <= min(threads, ncpu) + 0.5:
        return []
    mean = sum(loads) / len(loads)
    return [
        f"> **Note:** the 1-minute load average was {mean:.1f} on average (up to {worst:.1f}) on "
        f"{ncpu} CPUs during this run, whose own {threads} thread(s) account for "
        f"{min(threads, ncpu)}: other processes competed for the cores, so absolute "
        "tokens/s are lower and noisier than on a quiet machine. Methods were interleaved per "
        "question, so ratios are less affected than absolute figures.",
        "",
    ]


def _em(e: dict, name: str, reference: str) -> str:
    if name == reference:
        return "ref"
    if e.get("exact_compared"):
        return f"{e['exact_matched']}/{e['exact_compared']} ({_f(e['exact_match'], pct=True)})"
    return "–"


def _lossless(e: dict) -> str:
    return "yes" if e.get("lossless", True) else "**lossy**"


def _table(summary: dict, group: str) -> list[str]:
    ref = summary.get("reference", "ar")
    # HumanEval runs test every answer: pass@1 goes next to the speed of each method
    passk = any("pass_at_1" in e for e in summary["table"][group].values())
    rows = [
        "| method | lossless | tok/s (mean) | tok/s (total) | speedup vs own AR | vs ar | τ | α "
        "| exact match vs ar | prefill ms | decode s |" + (" pass@1 |" if passk else ""),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if passk else ""),
    ]
    for name in summary["methods"]:
        e = summary["table"][group].get(name, {})
        if e.get("skipped"):
            if group == OVERALL:
                rows.append(f"| `{name}` | | skipped (see Methods) | | | | | | | | |")
            continue
        if not e.get("questions"):
            continue
        pre = e.get("prefill_s")
        rows.append(
            "| "
            + " | ".join(
                [
                    f"`{name}`",
                    _lossless(e),
                    _f(e.get("tok_s_mean"), 1, e.get("tok_s_mean_std")),
                    _f(e.get("tok_s_total"), 1, e.get("tok_s_total_std")),
                    _f(e.get("speedup"), 2, e.get("speedup_std"))
                    + ("×" if e.get("speedup") else ""),
                    _f(e.get("vs_ar"), 2, e.get("vs_ar_std")) + ("×" if e.get("vs_ar") else ""),
                    _f(e.get("tau"), 2),
                    _f(e.get("alpha"), 2),
                    _em(e, name, ref),
                    _f(None if pre is None else 1000 * pre, 0),
                    _f(e.get("decode_s"), 2),
                    *([_f(e.get("pass_at_1"), 2)] if passk else []),
                ]
            )
            + " |"
        )
    return rows


def _methods_table(results: dict) -> list[str]:
    summary = results["summary"]
    overall = summary["table"][OVERALL]
    rows = [
        "| method | engine | lossless | speedup measured against | peak RSS MB | acceptance per "
        "draft position (first 8) | first mismatch vs ar | errors |",
        "|---|---|---|---|--:|---|---|--:|",
    ]
    for name, info in results["methods"].items():
        e = overall.get(name, {})
        if info.get("skipped"):
            rows.append(f"| `{name}` | {info['engine']} | | | | | skipped: {info['skipped']} | |")
            continue
        acc = e.get("acceptance_per_pos")
        acc_s = " ".join(f"{a:.2f}" for a in acc[:8]) if acc else "–"
        fm = e.get("first_mismatch")
        fm_s = (
            f"question {fm['question_id']} ({fm['category']}), turn {fm['turn'] + 1}, "
            f"token {fm['token_index']}"
            if fm
            else ("ref" if name == summary.get("reference") else "none")
        )
        rows.append(
            f"| `{name}` | {info['engine']} | {_lossless(e)} | `{info['baseline']}` | "
            f"{_f(e.get('peak_rss_mb'), 0)} | {acc_s} | {fm_s} | {e.get('errors', 0)} |"
        )
    warned = [(n, i["warning"]) for n, i in results["methods"].items() if i.get("warning")]
    if warned:
        rows += [
            "",
            "Expected to be slower than plain decoding on this machine (run as asked):",
            "",
        ]
        rows += [f"- `{name}`: {why}" for name, why in warned]
    return rows


def report_markdown(results: dict) -> str:
    s = results["settings"]
    env = results["environment"]
    summary = results["summary"]
    model = results["model"]["name"]
    lines = [
        f"# veridraft bench: {model}, {_n(s['questions'], 'question')}",
        "",
        "```",
        env.get("command", ""),
        "```",
        "",
        f"{_n(s['questions'], 'question')} from `{Path(s['questions_file']).name}`"
        + (f" ({s['split']} task ids)" if s.get("split") else "")
        + (f" ({s['limit']} per task group, picked evenly)" if s.get("limit") else "")
        + f", max {s['max_new_tokens']} new tokens, "
        + ("greedy" if not s["temperature"] else f"temperature {s['temperature']}")
        + f", {_n(s['repeats'], 'repeat')}"
        + (" (mean ± std over repeats)" if s["repeats"] > 1 else "")
        + f", {_n(s['warmup'], 'warm-up run')} per method, {_n(s['threads'], 'thread')}, "
        f"batch size 1; the run took {_duration(s['elapsed_s'])}. Generated {env['date']}.",
        "",
        *_load_warning(env, s, results.get("records", [])),
        HOW_TO_READ,
        "",
        "## Overall",
        "",
        *_table(summary, OVERALL),
        "",
        *fidelity_markdown(results),
        *long_table(results.get("long") or []),
        "## Per task group",
        "",
    ]
    for g in summary["groups"]:
        if g == OVERALL:
            continue
        n = next(
            (e.get("questions") for e in summary["table"][g].values() if e.get("questions")), 0
        )
        lines += [f"### {g} ({_n(n, 'question')})", "", *_table(summary, g), ""]
    lines += [
        "## Methods",
        "",
        *_methods_table(results),
        "",
        "Peak RSS is process-wide (every loaded model counts), measured per generation as "
        "the kernel's high-water mark since the previous generation."
        + (
            f" After loading every method's models the process had peaked at "
            f"{results['peak_rss_after_load_mb']:,.0f} MB."
            if results.get("peak_rss_after_load_mb")
            else ""
        ),
        "",
    ]
    b = results.get("bandwidth_bound")
    if b:
        ar = summary["table"][OVERALL].get("ar", {}).get("tok_s_mean")
        lines += [
            "## Memory-bandwidth bound",
            "",
            f"Plain decoding reads every weight once per token: "
            f"{_mb(b['weight_bytes_per_token'])} of weights + "
            f"{_mb(b['kv_bytes_per_token'])} of KV cache (at the mean context of "
            f"{b['mean_context_tokens']:.0f} tokens). With the measured copy bandwidth of "
            f"{b['copy_bandwidth_GBps']:.1f} GB/s (256 MB tensor copy, best of 7), plain decoding "
            f"cannot exceed **{b['bound_tokens_per_s']:.1f} tok/s**"
            + (
                f"; veridraft `ar` reaches {ar:.1f} tok/s = {100 * ar / b['bound_tokens_per_s']:.0f}% "
                "of it."
                if ar
                else "."
            ),
            "",
        ]
    lines += ["## Environment", "", "| | |", "|---|---|"]
    for k in (
        "date",
        "cpu",
        "cpu_count",
        "threads",
        "torch_threads",
        "load_average_start",
        "load_average",
        "env_vars",
        "veridraft",
        "torch",
        "transformers",
        "llama_cpp_python",
        "python",
        "platform",
    ):
        lines.append(f"| {k} | {env.get(k) if env.get(k) is not None else '–'} |")
    lines += [f"| model | {model} ({results['model'].get('precision') or '?'}) |", ""]
    return "\n".join(lines)


def overview_text(results: dict) -> str:
    """A short plain-text table of the overall figures for the terminal."""
    summary = results["summary"]
    t = summary["table"][OVERALL]
    ref = summary.get("reference", "ar")
    out = [
        f"{'method':<28} {'tok/s':>8} {'speedup':>8} {'vs ar':>7} {'tau':>6} {'alpha':>6} "
        f"{'exact':>9} {'pass@1':>7} {'peak MB':>8}"
    ]
    for name in summary["methods"]:
        e = t.get(name, {})
        if e.get("skipped"):
            out.append(f"{name:<28} skipped: {e['skipped']}")
            continue
        em = _em(e, name, ref).split(" ")[0]
        out.append(
            f"{name:<28} {_f(e.get('tok_s_mean'), 1):>8} {_f(e.get('speedup')):>8} "
            f"{_f(e.get('vs_ar')):>7} {_f(e.get('tau')):>6} {_f(e.get('alpha')):>6} {em:>9} "
            f"{_f(e.get('pass_at_1')):>7} {_f(e.get('peak_rss_mb'), 0):>8}"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# plot


def plot_speedup(results: dict, path: Path) -> Path:
    """Grouped bars, methods x task groups: speedup vs own plain decoding (left, with a 1.0
    line) and absolute tokens/s (right)."""
    # matplotlib takes ~0.5 s to import: only the commands that draw pay for it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    groups = summary["groups"]
    info = results["methods"]
    names = [n for n in summary["methods"] if not info[n].get("skipped")]
    drafted = [n for n in names if info[n]["baseline"] != n]
    colors = plt.get_cmap("tab10")
    color = {n: colors(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(1, 2, figsize=(max(12, 1.6 * len(groups) * 2 + 2), 5.2))

    def bars(ax, methods, key, ylabel, title, digits):
        w = 0.8 / max(1, len(methods))
        labels = len(methods) * len(groups) <= 32
        for i, n in enumerate(methods):
            vals = [summary["table"][g].get(n, {}).get(key) for g in groups]
            errs = [summary["table"][g].get(n, {}).get(key + "_std") for g in groups]
            xs = [j + (i - (len(methods) - 1) / 2) * w for j in range(len(groups))]
            label = n + ("" if info[n].get("lossless", True) else " (lossy)")
            bc = ax.bar(
                xs,
                [v or 0 for v in vals],
                w,
                label=label,
                color=color[n],
                yerr=[e or 0 for e in errs] if any(errs) else None,
                capsize=2,
            )
            if labels:
                ax.bar_label(
                    bc,
                    labels=[_f(v, digits) for v in vals],
                    fontsize=6.5,
                    padding=1,
                    rotation=90 if len(methods) > 3 else 0,
                )
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
        ax.legend(fontsize=8, loc="upper left", ncol=2)

    if drafted:
        bars(
            axes[0],
            drafted,
            "speedup",
            "speedup (× own plain decoding)",
            "Speedup vs the engine's own plain decoding (mean of rates)",
            2,
        )
    else:
        axes[0].text(0.5, 0.5, "no drafting method", ha="center", va="center")
        axes[0].set_xticks([])
    axes[0].axhline(1.0, color="black", lw=1, ls="--")
    bars(
        axes[1],
        names,
        "tok_s_mean",
        "tokens/s (mean of per-question rates)",
        "Absolute speed, all methods",
        0,
    )
    date = results["environment"]["date"][:10]
    s = results["settings"]
    fig.suptitle(
        f"{results['model']['name']}: {_n(s['questions'], 'question')}, max "
        f"{s['max_new_tokens']} new tokens, "
        + ("greedy" if not s.get("temperature") else f"T={s['temperature']}")
        + f", batch 1, {_n(s['threads'], 'thread')} ({date})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# files


def write_all(results: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "results": str(out / "results.json"),
        "report": str(out / "report.md"),
        "plot": str(out / "speedup.png"),
    }
    # results.json names its sibling files only: a result folder is moved, shared and committed
    results = {**results, "files": {k: Path(v).name for k, v in files.items()}}
    Path(files["results"]).write_text(json.dumps(results, indent=1, default=str) + "\n")
    Path(files["report"]).write_text(report_markdown(results))
    plot_speedup(results, Path(files["plot"]))
    return files


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise VeridraftError(f"no such results file: {p}") from None
    except json.JSONDecodeError as e:
        raise VeridraftError(f"{p} is not a JSON results file ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or "records" not in data or "methods" not in data:
        raise VeridraftError(f"{p} is not a veridraft bench results.json")
    if "summary" not in data:
        data["summary"] = summarize(data["records"], data["methods"])
    return data


def compare(a: dict, b: dict, group: str | None = None, names=("A", "B")) -> str:
    """Per-method change in tok/s (mean of rates), speedup and τ between two runs."""
    sa, sb = a["summary"], b["summary"]
    groups = [group] if group else [OVERALL] + [g for g in sa["groups"] if g != OVERALL]
    methods = list(sa["methods"]) + [m for m in sb["methods"] if m not in sa["methods"]]
    lines = []
    diffs = []
    for k in ("questions", "max_new_tokens", "temperature", "threads", "repeats"):
        va, vb = a["settings"].get(k), b["settings"].get(k)
        if va != vb:
            diffs.append(f"{k} {va} -> {vb}")
    if a["environment"].get("cpu") != b["environment"].get("cpu"):
        diffs.append(f"cpu {a['environment'].get('cpu')} -> {b['environment'].get('cpu')}")
    if a["model"]["name"] != b["model"]["name"]:
        diffs.append(f"model {a['model']['name']} -> {b['model']['name']}")
    lines.append(f"{names[0]}: {a['model']['name']}, {a['environment'].get('date')}")
    lines.append(f"{names[1]}: {b['model']['name']}, {b['environment'].get('date')}")
    if diffs:
        lines.append("note: the runs differ in " + "; ".join(diffs))
    for g in groups:
        if g not in sa["table"] and g not in sb["table"]:
            raise VeridraftError(f"task group {g!r} is in neither run")
        lines.append("")
        lines.append(f"[{g}]")
        lines.append(
            f"{'method':<28} {'tok/s A -> B':>22} {'speedup A -> B':>18} {'tau A -> B':>16}"
        )
        for m in methods:
            ea = sa["table"].get(g, {}).get(m, {})
            eb = sb["table"].get(g, {}).get(m, {})
            if not ea.get("questions") and not eb.get("questions"):
                continue

            def ch(key, d=1, ea=ea, eb=eb):
                x, y = ea.get(key), eb.get(key)
                s = f"{_f(x, d)} -> {_f(y, d)}"
                if x and y is not None:
                    s += f" ({100 * (y / x - 1):+.0f}%)"
                return s

            lines.append(
                f"{m:<28} {ch('tok_s_mean'):>22} {ch('speedup', 2):>18} {ch('tau', 2):>16}"
            )
    return "\n".join(lines)


def compare_files(a: str | Path, b: str | Path, group: str | None = None) -> str:
    return compare(load_results(a), load_results(b), group, names=(str(a), str(b)))


def rewrite_report(path: str | Path, out: str | Path | None = None) -> dict:
    """Write report.md and speedup.png again from a results.json (metrics recomputed)."""
    data = load_results(path)
    old = data["summary"]
    data["summary"] = summarize(data["records"], data["methods"])
    _carry_over(old, data["summary"])
    src = Path(path)
    folder = Path(out) if out else (src if src.is_dir() else src.parent)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"report": str(folder / "report.md"), "plot": str(folder / "speedup.png")}
    (folder / "report.md").write_text(report_markdown(data))
    plot_speedup(data, folder / "speedup.png")
    return files


def _carry_over(old: dict, new: dict) -> None:
    """Keep what the run added to its summary beyond `summarize` (pass@1 from the unit tests,
    fidelity and retrieval scores against the reference), which records alone cannot redo."""
    for key, value in old.items():
        new.setdefault(key, value)
    for group, table in old.get("table", {}).items():
        for name, entry in table.items():
            target = new.get("table", {}).get(group, {}).get(name)
            if target is not None:
                for key, value in entry.items():
                    target.setdefault(key, value)
