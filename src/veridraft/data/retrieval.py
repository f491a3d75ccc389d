"""A RULER-style retrieval set, generated offline: needles ("The special magic number for KEY
is 1234567.") hidden at chosen depths of long novel text, at a chosen context length in tokens
of a given tokenizer, with the exact answers and a scorer.

    items = make_set("smollm2-135m", context=8192, n=20, seed=0)            # single-key
    items = make_set(tok, context="4k", n=10, tasks=("single", "multikey"))
    score(answer_text, items[0])   # fraction of the expected values present, exact digits

Tasks (after RULER's niah_single / niah_multikey / niah_multivalue / niah_multiquery):
- `single`: one needle; its value is asked.
- `multikey`: `needles` needles with different keys (default 4); one of them is asked.
- `multivalue`: `needles` needles with the same key and different values; all values are asked.
- `multiquery`: `needles` needles with different keys; all of them are asked.

The prompt is completion-style raw text (no chat template): it ends with the answer's opening
words ("... The special magic number for KEY mentioned in the provided text is"), so base models
answer too. `context` counts the whole prompt plus the `gen_tokens` the answer may take: the
prompt is at most `context - gen_tokens` tokens and at least `tolerance` below it.

Determinism: an item depends only on (seed, task, context, index, tokenizer, haystack file);
the random source is `random.Random` seeded with a string of those (stable across runs).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import VeridraftError
from ..tokenizer import Tokenizer
from .books import books_path, read_lines

TASKS = ("single", "multikey", "multivalue", "multiquery")
CONTEXTS = {"2k": 2048, "4k": 4096, "8k": 8192, "16k": 16384, "32k": 32768}
BOOKS = ("emma", "mansfieldpark", "prideprejudice", "sensesensibility")

INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.\n\n"
)
NEEDLE = "The special magic number for {key} is {value}."
Q_ONE = (
    "\n\nWhat is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)
Q_VALUES = (
    "\n\nWhat are all the special magic numbers for {key} mentioned in the provided text? "
    "The special magic numbers for {key} mentioned in the provided text are"
)
Q_KEYS = (
    "\n\nWhat are all the special magic numbers for {keys} mentioned in the provided text? "
    "The special magic numbers for {keys} mentioned in the provided text are"
)

# Key words: two short lists give 3,600 adjective-noun keys ("quiet-harbour"); drawn without
# repetition inside an item so that no two needles of one item share a key by accident.
ADJECTIVES = (
    "amber azure bitter brave brisk calm clever cobalt crimson curious damp dusty eager early "
    "faint fierce fluffy frozen gentle gilded glossy golden grumpy hollow humble icy jolly "
    "lively lonely lucky marble mellow misty narrow noble odd pale plucky polished proud quiet "
    "rapid restless rosy rusty scarlet shy silent silver sleepy slender smoky solemn spotted "
    "sturdy tawny tidy velvet vivid wandering"
).split()
NOUNS = (
    "anchor apricot badger beacon bell bramble canyon cedar chimney clover comet compass "
    "cricket dolphin ember falcon fern fiddle glacier harbour hazel heron island kettle lantern "
    "lemon lighthouse maple meadow mirror moth nutmeg orchard otter parrot pebble pepper "
    "pigeon pillow quarry quill raven ribbon saddle spindle sparrow squirrel teapot thistle "
    "thimble tulip umbrella violin walnut whistle willow window"
).split()


@dataclass
class Needle:
    key: str
    value: str
    depth: float  # asked depth, 0 = start of the haystack, 1 = end
    char_start: int  # where the needle sentence starts in the prompt text
    token_start: int  # ... and at which prompt token (tokenizer's count of the text before it)
    token_depth: float  # measured depth: (token_start - haystack start) / haystack tokens


@dataclass
class RetrievalItem:
    id: str
    task: str
    context: int  # the context length asked for (prompt + answer budget), in tokens
    prompt: str  # raw completion-style text
    prompt_tokens: int  # tokens of `prompt` with the tokenizer's special tokens (BOS if any)
    gen_tokens: int  # tokens the answer may take (max_new_tokens)
    answers: list[str]  # values that must appear in the answer
    queries: list[str]  # the keys asked
    needles: list[Needle] = field(default_factory=list)
    book: str = ""
    seed: int = 0
    tokenizer: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RetrievalItem:
        d = dict(d)
        d["needles"] = [Needle(**n) for n in d.get("needles", [])]
        return cls(**d)


def parse_context(value: int | str) -> int:
    """8192, "8192", "8k" -> 8192 (k = 1024 tokens)."""
    if isinstance(value, str):
        v = value.strip().lower()
        if v in CONTEXTS:
            return CONTEXTS[v]
        m = re.fullmatch(r"(\d+)(k?)", v)
        if not m:
            raise VeridraftError(
                f"context must be a token count or one of {', '.join(CONTEXTS)}, got {value!r}"
            )
        value = int(m.group(1)) * (1024 if m.group(2) else 1)
    if int(value) != value or value < 256:
        raise VeridraftError(f"context must be at least 256 tokens, got {value!r}")
    return int(value)


def default_haystack_path() -> Path:
    """The novels shipped in the package (or a data checkout's copy: `books_path()`)."""
    return books_path()


def load_books(
    path: str | Path | None = None, books: Iterable[str] | None = None
) -> dict[str, str]:
    """{book key: the whole text, chapters joined by blank lines} for the books asked (None:
    every book of the file; the default file holds the four novels meant for this)."""
    path = Path(path) if path else default_haystack_path()
    want = None if books is None else list(books)
    out: dict[str, str] = {}
    lines = read_lines(path)
    for line in lines:
        if not line.strip():
            continue
        rec = json.loads(line)
        if want is None or rec.get("key") in want:
            out[rec["key"]] = "\n\n".join(c["text"] for c in rec["chapters"])
    if not out and want is None:
        raise VeridraftError(f"the haystack file {path} holds no book")
    missing = [b for b in want or () if b not in out]
    if missing:
        raise VeridraftError(
            f"the haystack file {path} has no book {', '.join(missing)}; "
            f"it has {', '.join(sorted(out)) or 'none of them'}"
        )
    return out


def resolve_tokenizer(tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """A Tokenizer from itself, a catalog model name (pulled) or a folder with tokenizer.json."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    from ..models import catalog

    name = str(tokenizer)
    if name in catalog.CATALOG:
        folder = catalog.model_dir(name)
        if not (folder / "tokenizer.json").is_file():
            raise VeridraftError(
                f"{name} is not pulled yet; run `veridraft models pull {name}` first"
            )
        return Tokenizer.from_folder(folder)
    if Path(name).expanduser().is_dir():
        return Tokenizer.from_folder(name)
    raise VeridraftError(
        f"tokenizer {name!r} is neither a catalog model ({', '.join(catalog.CATALOG)}) nor a "
        "folder with tokenizer.json"
    )


_SENTENCE_END = re.compile(r"(?<=[.!?\"'])\s+(?=[A-Z\"'])")


def _sentences(text: str) -> list[str]:
    """Sentences with their trailing whitespace kept, so that ''.join() gives the text back."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def _keys(rng: random.Random, n: int) -> list[str]:
    pairs = rng.sample(range(len(ADJECTIVES) * len(NOUNS)), n)
    return [f"{ADJECTIVES[p // len(NOUNS)]}-{NOUNS[p % len(NOUNS)]}" for p in pairs]


def _values(rng: random.Random, n: int) -> list[str]:
    vals: list[str] = []
    while len(vals) < n:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in vals:
            vals.append(v)
    return vals


def _plan(task: str, rng: random.Random, needles: int, depth: float):
    """(needle (key, value, depth) list in insertion order, asked keys, answers)."""
    if task == "single":
        (k,), (v,) = _keys(rng, 1), _values(rng, 1)
        return [(k, v, depth)], [k], [v]
    if needles < 2:
        raise VeridraftError(f"task {task} needs needles >= 2, got {needles}")
    # the asked needle (the first) sits at `depth`; the others at random depths
    depths = [depth] + [rng.random() for _ in range(needles - 1)]
    vals = _values(rng, needles)
    if task == "multivalue":
        (k,) = _keys(rng, 1)
        return [(k, v, d) for v, d in zip(vals, depths)], [k], vals
    keys = _keys(rng, needles)
    plan = list(zip(keys, vals, depths))
    if task == "multikey":
        return plan, [keys[0]], [vals[0]]
    if task == "multiquery":
        return plan, keys, vals
    raise VeridraftError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")


def _question(task: str, queries: list[str]) -> str:
    if task in ("single", "multikey"):
        return Q_ONE.format(key=queries[0])
    if task == "multivalue":
        return Q_VALUES.format(key=queries[0])
    keys = ", ".join(queries[:-1]) + " and " + queries[-1]
    return Q_KEYS.format(keys=keys)


def _assemble(sents: list[str], counts: list[int], plan, n_sent: int, question: str):
    """Prompt text (intro, haystack, question) with the needles put at sentence boundaries of the first n_sent sentences:
    (text, haystack char start, [(needle index, char start)])."""
    cum = [0]
    for c in counts[:n_sent]:
        cum.append(cum[-1] + c)
    total = cum[-1] or 1
    # boundary b = before sentence b; the one nearest to depth * haystack tokens
    slots: dict[int, list[int]] = {}
    for j, (_, _, d) in enumerate(plan):
        want = d * total
        b = min(range(n_sent + 1), key=lambda i: (abs(cum[i] - want), i))
        slots.setdefault(b, []).append(j)
    parts = [INTRO]
    pos = len(INTRO)
    starts: list[tuple[int, int]] = []
    for b in range(n_sent + 1):
        for j in slots.get(b, []):
            key, value, _ = plan[j]
            piece = NEEDLE.format(key=key, value=value)
            # a needle stands as its own sentence: a space after it unless it ends the text
            sep = " " if b < n_sent else ""
            if b == n_sent and parts[-1] and not parts[-1][-1].isspace():
                parts.append(" ")
                pos += 1
            starts.append((j, pos))
            parts.append(piece + sep)
            pos += len(piece + sep)
        if b < n_sent:
            parts.append(sents[b])
            pos += len(sents[b])
    return "".join(parts).rstrip() + question, len(INTRO), starts


def make_item(
    tok: Tokenizer,
    books: dict[str, str],
    *,
    task: str = "single",
    context: int = 4096,
    depth: float = 0.5,
    index: int = 0,
    seed: int = 0,
    needles: int = 4,
    gen_tokens: int = 32,
    tolerance: float = 0.02,
) -> RetrievalItem:
    """One item; see the module docstring. `depth` places the asked needle."""
    if task not in TASKS:
        raise VeridraftError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise VeridraftError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(f"retrieval:{seed}:{task}:{context}:{index}")
    plan, queries, answers = _plan(task, rng, needles, depth)
    budget = context - gen_tokens
    question = _question(task, queries)
    fixed = len(tok.encode(INTRO + question))
    fixed += sum(len(tok.encode(NEEDLE.format(key=k, value=v), False)) + 1 for k, v, _ in plan)
    if budget - fixed < 64:
        raise VeridraftError(
            f"context {context} leaves no room for a haystack after the question, the needles "
            f"and gen_tokens={gen_tokens}; raise the context"
        )
    book = sorted(books)[rng.randrange(len(books))]
    text = books[book]
    # a start at a paragraph chosen at random; the text wraps around to the book's start
    paras = [m.start() for m in re.finditer(r"(?:^|\n\n)(?=\S)", text)]
    start = paras[rng.randrange(len(paras))]
    start = start + 2 if text[start : start + 2] == "\n\n" else start
    src = text[start:] + "\n\n" + text[:start]
    sents: list[str] = []
    counts: list[int] = []
    have = 0
    # ~4 characters a token in English prose: take sentences until the estimate passes the
    # budget with a margin, then count exactly
    for s in _sentences(src):
        sents.append(s)
        counts.append(len(tok.encode(s, False)))
        have += counts[-1]
        if have > (budget - fixed) * 1.1 + 64:
            break
    lo = budget - max(1, int(tolerance * context))
    n_sent = len(sents)
    est = fixed + sum(counts)
    while n_sent > 1 and est > budget:
        n_sent -= 1
        est -= counts[n_sent]
    # the sum of sentence counts is close to, not equal to, the joined text's count: a few exact
    # re-counts move the cut by whole sentences until the prompt lands in [lo, budget]
    for _ in range(20):
        prompt, hay_start, starts = _assemble(sents, counts, plan, n_sent, question)
        n_tok = len(tok.encode(prompt))
        if n_tok > budget and n_sent > 1:
            over = n_tok - budget
            while over > 0 and n_sent > 1:
                n_sent -= 1
                over -= counts[n_sent]
        elif n_tok < lo and n_sent < len(sents) and n_tok + counts[n_sent] <= budget:
            room = budget - n_tok
            while n_sent < len(sents) and counts[n_sent] <= room:
                room -= counts[n_sent]
                n_sent += 1
        else:
            break
    if n_tok < lo and n_sent < len(sents):
        # the next sentence is longer than the room left: end on its first words instead
        words = sents[n_sent].split(" ")
        sents, counts = sents[:n_sent], counts[:n_sent]
        a, b = 0, len(words)
        while a < b:  # the most words that still fit
            m = (a + b + 1) // 2
            frag = " ".join(words[:m])
            text_m, _, _ = _assemble([*sents, frag], [*counts, 0], plan, n_sent + 1, question)
            if len(tok.encode(text_m)) <= budget:
                a = m
            else:
                b = m - 1
        if a:
            frag = " ".join(words[:a])
            sents.append(frag)
            counts.append(len(tok.encode(frag, False)))
            n_sent += 1
            prompt, hay_start, starts = _assemble(sents, counts, plan, n_sent, question)
            n_tok = len(tok.encode(prompt))
    if n_tok < lo:
        raise VeridraftError(
            f"the haystack text ran out: item {index} has {n_tok} prompt tokens, below the "
            f"{lo} asked; use a longer haystack file or a smaller context"
        )
    hay_tok = len(tok.encode(prompt[:hay_start]))
    hay_len = n_tok - hay_tok - len(tok.encode(question, False))
    out_needles = []
    for j, cs in sorted(starts, key=lambda x: x[0]):
        key, value, d = plan[j]
        # the space before the needle belongs to its first token (" The")
        ts = len(tok.encode(prompt[:cs].rstrip(" ")))
        out_needles.append(
            Needle(
                key=key,
                value=value,
                depth=round(d, 4),
                char_start=cs,
                token_start=ts,
                token_depth=round((ts - hay_tok) / max(1, hay_len), 4),
            )
        )
    return RetrievalItem(
        id=f"{task}-{context}-{seed}-{index}",
        task=task,
        context=context,
        prompt=prompt,
        prompt_tokens=n_tok,
        gen_tokens=gen_tokens,
        answers=answers,
        queries=queries,
        needles=out_needles,
        book=book,
        seed=seed,
        tokenizer=tok.name,
    )


def default_depths(n: int) -> list[float]:
    """n depths spread evenly from 0 to 1 (RULER's linspace), 0.5 for one item."""
    if n == 1:
        return [0.5]
    return [round(i / (n - 1), 4) for i in range(n)]


def make_set(
    tokenizer: Tokenizer | str | Path,
    *,
    context: int | str = 4096,
    n: int = 20,
    seed: int = 0,
    tasks: Sequence[str] = ("single",),
    depths: Sequence[float] | None = None,
    needles: int = 4,
    gen_tokens: int = 32,
    haystack: str | Path | None = None,
    books: Iterable[str] | None = None,
) -> list[RetrievalItem]:
    """n items per task at `context` tokens; item i of a task puts its asked needle at
    depths[i % len(depths)] (default: n depths spread evenly over 0..1)."""
    if n < 1:
        raise VeridraftError(f"n must be at least 1, got {n}")
    ctx = parse_context(context)
    tok = resolve_tokenizer(tokenizer)
    if isinstance(tokenizer, str | Path) and tok.name == "this model":
        tok.name = Path(str(tokenizer)).name
    text = load_books(haystack, books)
    ds = list(depths) if depths else default_depths(n)
    bad = [d for d in ds if not 0.0 <= float(d) <= 1.0]
    if bad:
        raise VeridraftError(f"depths must be in [0, 1], got {bad[0]}")
    return [
        make_item(
            tok,
            text,
            task=task,
            context=ctx,
            depth=float(ds[i % len(ds)]),
            index=i,
            seed=seed,
            needles=needles,
            gen_tokens=gen_tokens,
        )
        for task in tasks
        for i in range(n)
    ]


def score(answer: str, item: RetrievalItem | dict) -> float:
    """Fraction of the item's values found in the answer, each as an exact digit run (RULER's
    string_match_all: "12345670" does not count for "1234567")."""
    answers = item.answers if isinstance(item, RetrievalItem) else item["answers"]
    found = sum(1 for v in answers if re.search(rf"(?<!\d){re.escape(v)}(?!\d)", answer))
    return found / len(answers)


def accuracy(answers: Sequence[str], items: Sequence[RetrievalItem | dict]) -> float:
    """Mean score over items (answers in the same order)."""
    if len(answers) != len(items):
        raise VeridraftError(f"{len(answers)} answers for {len(items)} items")
    return sum(score(a, it) for a, it in zip(answers, items)) / len(items)


def write_jsonl(items: Sequence[RetrievalItem], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_dict()) + "\n")


def read_jsonl(path: str | Path) -> list[RetrievalItem]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise VeridraftError(f"cannot read the retrieval set {path}: {e}") from e
    return [RetrievalItem.from_dict(json.loads(x)) for x in lines if x.strip()]
