"""What `precision="auto"` and `draft="auto"` (the defaults of `load`, `generate` and the
command line) choose, and why.

The precision: the mode whose one-token forward `veridraft profile` measured fastest for this
model on this machine, when it measured any; else a table of what was measured on each CPU
family (docs/performance/): 4-bit weights from the model's GGUF where it has one (`q4a8` on
CPUs with AVX512-VNNI, `q4` with AVX2), else `bf16` with AMX, `fp16w` with AVX-512, `fp32`.

The drafter: SuffixDecoding (`suffix`) when speculation can pay in this mode at this prompt's
length, else none (plain decoding). SuffixDecoding proposes nothing when its tries hold no
confident continuation, so a prompt it cannot help costs a trie look-up per token, not a wider
forward; where it matches (code, edits, summaries, repeated phrasing) it drafts token trees.
Speculation cannot pay where a forward over a few tokens costs much more than one: in `fp32`
and `fp16w` (measured 0.99x for prompt lookup and 0.61x for layer-skip in fp32 on an AMD EPYC
Zen 4), and over long prompts that no cost profile sizes trees for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

AUTO = "auto"

# Modes whose verification forward over 8 rows costs close to one row (docs/performance/): the
# modes where training-free drafts (tau ~1.5-2 on general text) pay.
FLAT_MODES = ("q4", "q4a8", "bf16")

# A cost profile that prices a forward over this many tokens (a default suffix tree) above this
# multiple of one leaves too little for tau ~1.5-2 to gain.
TREE_ROWS = 8
MAX_RELATIVE_COST = 1.6

# From this many prompt tokens on, a tree sized for short prompts can lose (measured: suffix at
# 0.50x plain decoding on a 16k-token prompt without a cost profile).
LONG_PROMPT = 4096


@dataclass(frozen=True)
class Choice:
    """What an `auto` setting resolved to (`value`; None: no drafter) and the one-line reason."""

    value: str | None
    why: str

    def note(self, what: str) -> str:
        return f"auto {what}: {self.value or 'none (plain decoding)'} ({self.why})"


def _profiled(folder: Path | None, name: str, precisions: set[str]) -> dict[str, float]:
    """precision -> measured ms of a one-token forward (plus a thousandth of 8 tokens', a
    tie-break), from the cost profiles stored for this model on this machine."""
    from .costmodel import CostModel, cost_paths

    where = SimpleNamespace(name=name, path=folder)
    out: dict[str, float] = {}
    for precision in sorted(precisions):
        for p in cost_paths(where, precision):
            if not p.is_file():
                continue
            try:
                cost = CostModel.read(p)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a profile only tunes a default; an unreadable one is ignored
            out[precision] = cost.forward(1) + 1e-3 * cost.forward(TREE_ROWS)
            break
    return out


def pick_precision(folder: Path | None, name: str, has_gguf: bool) -> Choice:
    """The fastest precision this CPU runs for this model (see the module docstring)."""
    from .models import kernels

    runnable = {"fp32", "fp16w", "bf16"} | ({"q4", "q4a8"} if has_gguf else set())
    isa = kernels.isa()
    if isa != "avx512bf16":
        runnable.discard("q4a8")  # its kernel needs AVX512-VNNI
    measured = _profiled(folder, name, runnable)
    if measured:
        best = min(measured, key=measured.get)
        others = ", ".join(f"{p} {measured[p]:.1f} ms" for p in sorted(measured, key=measured.get))
        return Choice(best, f"fastest one-token forward measured here: {others}")
    flags = kernels.cpu_flags()
    cpu = kernels.cpu_name()
    if has_gguf and isa == "avx512bf16":
        return Choice("q4a8", f"the model's GGUF blocks with 8-bit activations on {cpu} (VNNI)")
    if has_gguf and isa == "avx2":
        return Choice("q4", f"the model's GGUF blocks on {cpu} (AVX2)")
    if "amx_bf16" in flags:
        return Choice("bf16", f"no GGUF; bfloat16 on {cpu} (AMX)")
    if isa == "avx512bf16":
        return Choice("fp16w", f"no GGUF; 16-bit weights on {cpu} (AVX-512)")
    return Choice("fp32", f"no GGUF and no fast 16-bit path on {cpu}")


def pick_draft(model, prompt_tokens: int, cost=None, chain_only: bool = False) -> Choice:
    """The drafter expected to win for this prompt in this model's mode, or none.

    cost: this machine's CostModel for the model (None: not profiled). chain_only: the
    acceptance rule takes chains only (loose verification), so a tree drafter is out."""
    precision = getattr(model, "precision", None) or "fp32"
    method = "ngram" if chain_only else "suffix"
    if cost is not None:
        rel = cost.relative(TREE_ROWS, prompt_tokens, tree=not chain_only)
        if rel > MAX_RELATIVE_COST:
            return Choice(
                None,
                f"a forward over {TREE_ROWS} tokens costs {rel:.2f}x one here at "
                f"{prompt_tokens} cached tokens ({precision}, measured); drafts would not repay it",
            )
        return Choice(
            method,
            f"a forward over {TREE_ROWS} tokens costs {rel:.2f}x one here ({precision}, measured)",
        )
    if precision not in FLAT_MODES:
        return Choice(
            None,
            f"in {precision} a forward over several tokens costs several single ones, so "
            "speculation does not pay; the q4/q4a8/bf16 modes are where it does",
        )
    if prompt_tokens >= LONG_PROMPT:
        name = getattr(model, "name", None) or "MODEL"
        return Choice(
            None,
            f"{prompt_tokens} prompt tokens and no cost profile sizes drafts at that length; "
            f"`veridraft profile --model {name} --precision {precision} --contexts 100,1000,"
            f"{-(-prompt_tokens // 1024)}k` measures one",
        )
    return Choice(method, f"{precision} verifies several tokens for about the price of one")
