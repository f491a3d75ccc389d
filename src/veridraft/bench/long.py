"""The long-document suite (`veridraft bench --suite long`): tasks cut from real novels.

Data: `austen.jsonl` (four public-domain novels split into chapters, one novel a line). Tasks:

- `continue` (MagicDec / TriForce protocol): a novel from its first chapter up to a cut at N
  tokens, raw text (no chat template), then the method generates; one task per context length.
- `summarise`: one whole chapter of 3-9k tokens with an instruction to summarise it (the chat
  template when the model has one).
- `questions` (instruction models only: a chat template): a passage of N tokens, then two
  questions about it, asked as two turns of one conversation.

Every task is built from the token ids of the model's own tokenizer, so the context lengths are
exact; a length that does not fit the model's context (prompt + new tokens) is cut to fit and
the record says how many prompt tokens it had. Task construction is deterministic: the same
data, tokenizer and settings give the same prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..data.books import books_path, read_lines
from ..errors import VeridraftError
from .questions import Question

LONG_TASKS = ("continue", "summarise", "questions")
DEFAULT_CONTEXTS = "2k,4k,8k"
DEFAULT_TASKS = "continue,summarise,questions"
SUMMARY_TOKENS = (3000, 9000)  # chapters this long (in the model's tokens) are summarised
# books of the file in the order tasks draw on them: continuation cuts the first, questions are
# asked about the second, so the two tasks do not share a prefix
CONTINUE_BOOK, QUESTIONS_BOOK = 0, 2
SUMMARY_INSTRUCTION = "Summarise the following chapter of {book} in one paragraph."
PASSAGE_QUESTIONS = (
    "Which characters appear in the passage above, and how are they related to each other?",
    "What happens in the last scene of the passage? Answer in a few sentences.",
)
# room kept for the chat template's tokens and a turn's question when a passage is cut
TEMPLATE_ROOM = 64


@dataclass
class Book:
    key: str
    title: str
    chapters: list[tuple[str, str]]  # (title, text)

    def text(self, first: int = 0, last: int | None = None) -> str:
        chs = self.chapters[first:last]
        return "\n\n".join(f"{t}\n\n{x}" for t, x in chs)


def tokens(piece: str) -> int | None:
    """`8k` -> 8192, `7400` -> 7400 (k = 1024); None when `piece` is not a length."""
    p = piece.strip().lower()
    mult = 1024 if p.endswith("k") else 1
    try:
        return int(float(p[:-1] if mult > 1 else p) * mult)
    except ValueError:
        return None


def parse_context(text: str | int | Sequence) -> list[int]:
    """`8k`, `2k,4k,8k`, `7400` or a list of those -> token counts (k = 1024)."""
    items = [text] if isinstance(text, int | str) else list(text)
    out: list[int] = []
    for item in items:
        for p in str(item).split(","):
            p = p.strip().lower()
            if not p:
                continue
            n = tokens(p)
            if n is None:
                raise VeridraftError(
                    f"--context {p!r} is not a length: give tokens like 8k, 2k,4k,8k or 7400"
                )
            if n < 16:
                raise VeridraftError(f"--context {p!r} is too short: give at least 16 tokens")
            out.append(n)
    if not out:
        raise VeridraftError("--context is empty: give lengths like 8k or 2k,4k,8k")
    return sorted(set(out))


def parse_tasks(text: str | Sequence[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    tasks = [t.strip() for t in items if t.strip()]
    bad = [t for t in tasks if t not in LONG_TASKS]
    if bad or not tasks:
        raise VeridraftError(
            f"unknown long task {bad[0] if bad else '(none)'!r}; choose from {', '.join(LONG_TASKS)}"
        )
    return list(dict.fromkeys(tasks))


def label(n: int) -> str:
    """A context length as the suite names it: 8192 -> 8k, 7400 -> 7400."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def default_data_path() -> Path:
    """The novels shipped in the package (or a data checkout's copy: `books_path()`)."""
    return books_path()


def load_books(path: str | Path) -> list[Book]:
    """Read austen.jsonl: one {"book", "key", "chapters": [{"title", "text"}]} per line."""
    path = Path(path)
    lines = read_lines(path)
    books = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            chapters = [(c["title"], c["text"]) for c in d["chapters"]]
            books.append(Book(d["key"], d["book"], chapters))
        except (ValueError, KeyError, TypeError) as e:
            raise VeridraftError(
                f"{path}, line {i}: not a book line ({e}); expected "
                '{"book": ..., "key": ..., "chapters": [{"title": ..., "text": ...}]}'
            ) from e
    if not books:
        raise VeridraftError(f"{path} holds no books")
    return books


def _prefix_ids(encode: Callable[[str], list[int]], book: Book, n: int) -> list[int]:
    """The first n token ids of the book's text: whole chapters are added until the text is
    long enough, so the whole novel is never tokenized for a short cut."""
    for last in range(1, len(book.chapters) + 1):
        ids = encode(book.text(0, last))
        if len(ids) > n:
            return ids[:n]
    raise VeridraftError(f"{book.title} is shorter than {n} tokens; choose a shorter --context")


def build_tasks(
    books: list[Book],
    encode_text: Callable[[str], list[int]],
    decode_text: Callable[[list[int]], str],
    encode_chat: Callable[[list[dict]], list[int]],
    *,
    contexts: Sequence[int],
    tasks: Sequence[str],
    max_new_tokens: int,
    context_limit: int | None,
    chat: bool,
    limit: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> tuple[list[Question], dict[str, list[int]]]:
    """The suite's questions, and the prompt ids of those whose prompt is raw ids (continuation)
    keyed by their turn text. Category = task@length (e.g. continue@8k); `limit` caps the
    chapters summarised (default 1)."""
    room = None if context_limit is None else context_limit - max_new_tokens
    questions: list[Question] = []
    raw: dict[str, list[int]] = {}

    def fit(n: int, turns: int, what: str, templated: bool = True) -> int:
        if room is None:
            return n
        spare = (turns - 1) * (max_new_tokens + TEMPLATE_ROOM)
        spare += TEMPLATE_ROOM if chat and templated else 0
        cut = min(n, room - spare)
        if cut < 16:
            raise VeridraftError(
                f"{what}: the model's context ({context_limit}) leaves no room for a prompt "
                f"beside {max_new_tokens} new tokens; lower --max-new-tokens"
            )
        if cut < n:
            log(f"{what}: cut to {cut} prompt tokens to fit the model's context {context_limit}")
        return cut

    if "continue" in tasks:
        book = books[CONTINUE_BOOK % len(books)]
        for n in contexts:
            ids = _prefix_ids(encode_text, book, fit(n, 1, f"continue@{label(n)}", templated=False))
            key = decode_text(ids)  # the turn's text; the prompt itself is the ids
            raw[key] = ids
            questions.append(
                Question(
                    f"continue-{book.key}-{len(ids)}",
                    f"continue@{label(n)}",
                    [key],
                    extra={"task": "continue", "book": book.key, "context": n},
                )
            )
    if "summarise" in tasks:
        lo, hi = SUMMARY_TOKENS
        hi = hi if room is None else min(hi, room - TEMPLATE_ROOM)
        picked = 0
        for book in books:
            for ci, (title, text) in enumerate(book.chapters):
                if picked >= (limit or 1):
                    break
                instr = SUMMARY_INSTRUCTION.format(book=book.title)
                content = f"{instr}\n\n{title}\n\n{text}"
                n = len(encode_chat([{"role": "user", "content": content}]))
                if lo <= n <= hi:
                    questions.append(
                        Question(
                            f"summarise-{book.key}-{ci + 1}",
                            "summarise",
                            [content],
                            extra={
                                "task": "summarise",
                                "book": book.key,
                                "chapter": ci + 1,
                                "tokens": n,
                            },
                        )
                    )
                    picked += 1
        if not picked:
            log(f"summarise: no chapter of {lo}-{hi} tokens fits; task skipped")
    if "questions" in tasks:
        if not chat:
            log("questions: the model has no chat template (not instruction-tuned); task skipped")
        else:
            book = books[QUESTIONS_BOOK % len(books)]
            for n in contexts:
                ids = _prefix_ids(encode_text, book, fit(n, 2, f"questions@{label(n)}"))
                passage = decode_text(ids)
                questions.append(
                    Question(
                        f"questions-{book.key}-{len(ids)}",
                        f"questions@{label(n)}",
                        [f"{passage}\n\n{PASSAGE_QUESTIONS[0]}", PASSAGE_QUESTIONS[1]],
                        extra={"task": "questions", "book": book.key, "context": n},
                    )
                )
    if not questions:
        raise VeridraftError("the long suite built no task; check --tasks and --context")
    return questions, raw


def kv_bytes(net, positions: int) -> int | None:
    """Bytes of veridraft's KV cache for `positions` positions (keys and values, every layer)."""
    cfg = getattr(net, "config", None)
    if cfg is None:
        return None
    elem = getattr(net, "cache_dtype", None)
    size = elem.itemsize if elem is not None else 4
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * positions * size


def long_summary(records: list[dict], net) -> list[dict]:
    """Per (task group, method): prompt tokens, prefill s and tokens/s, decode tokens/s (the new
    tokens after the first over the decode time), end-to-end tokens/s, peak RSS, KV bytes."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if not r.get("error"):
            rows.setdefault((r["group"], r["method"]), []).append(r)
    out = []
    for (group, method), rs in rows.items():

        def mean(xs):
            xs = [x for x in xs if x is not None]
            return sum(xs) / len(xs) if xs else None

        prompt = mean(r["prompt_tokens"] for r in rs)
        pre = mean(r.get("prefill_s") for r in rs)
        dec = mean(
            (r["new_tokens"] - 1) / r["decode_s"]
            for r in rs
            if r.get("decode_s") and r["new_tokens"] > 1
        )
        out.append(
            {
                "group": group,
                "method": method,
                "generations": len(rs),
                "prompt_tokens": prompt,
                "new_tokens": mean(r["new_tokens"] for r in rs),
                "prefill_s": pre,
                "prefill_tok_s": mean(
                    r["prompt_tokens"] / r["prefill_s"] for r in rs if r.get("prefill_s")
                ),
                "decode_tok_s": dec,
                "tok_s": mean(r.get("tokens_per_s") for r in rs),
                "peak_rss_mb": max((r.get("peak_rss_mb") or 0) for r in rs) or None,
                "kv_bytes": kv_bytes(
                    net, int(max(r["prompt_tokens"] + r["new_tokens"] for r in rs))
                )
                if not method.startswith(("hf:", "llamacpp:"))
                else None,
            }
        )
    return out


def long_table(rows: list[dict]) -> list[str]:
    """The suite's Markdown table (report.md)."""
    if not rows:
        return []

    def f(x, d=1):
        return "–" if x is None else f"{x:,.{d}f}"

    lines = [
        "## Long contexts",
        "",
        "Per task and context length: prefill = prompt through the model + first token (time to "
        "first token for peers); decode tok/s = new tokens after the first / decode time; "
        "tok/s = new tokens / whole call (Spec-Bench). KV MB is veridraft's cache at the "
        "longest prompt + new tokens (peers keep their own).",
        "",
        "| task | method | prompt tokens | prefill s | prefill tok/s | decode tok/s | tok/s | "
        "peak RSS MB | KV MB |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in sorted(rows, key=lambda r: (r["group"], r["method"])):
        kv = None if r["kv_bytes"] is None else r["kv_bytes"] / 2**20
        lines.append(
            f"| {r['group']} | {r['method']} | {f(r['prompt_tokens'], 0)} | {f(r['prefill_s'], 2)} "
            f"| {f(r['prefill_tok_s'], 0)} | {f(r['decode_tok_s'])} | {f(r['tok_s'])} "
            f"| {f(r['peak_rss_mb'], 0)} | {f(kv, 0)} |"
        )
    return [*lines, ""]
