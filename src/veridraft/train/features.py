"""The target's features over a corpus, computed once and kept on disk in shards.

Per sample (a window of a source file, or a prompt with the target's own greedy answer): the
token ids, the target's hidden states after the head's three layers (bfloat16, [T, 3 x dim]),
the target's top-k next-token probabilities at every position, and which positions' next token
the loss counts (all of a source file; the answer of a chat sample). The labels are the target's
own distribution, so the corpus only shapes the contexts.

Stored under ``$VERIDRAFT_HOME/features/<model>-<precision>-<corpus digest>/`` as
``shard-NNNNN-<first item>-<end item>.pt``, each written to a temporary name and renamed: a run
that is stopped continues after the last whole shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.spec_bench import group_of
from ..data.spec_bench import spread as _spread  # the benchmark's own pick
from ..errors import VeridraftError
from ..models.base import Capture

TOP_K = 8  # target probabilities kept per position (the soft labels)
SEQ_LEN = 512  # tokens per window of a source file
# windows per file: breadth over depth (a few large modules would otherwise fill the budget),
# and a stopped run loses at most one file's windows
FILE_WINDOWS = 4
SHARD_TOKENS = 8192  # tokens per shard at most...
SHARD_SECONDS = 60.0  # ...and seconds: what a stopped run may lose (answers come slowly)
CHUNK = 256  # rows per target forward (bounds the [rows, vocab] logits)
# answers generated together (generate_batch, each bitwise its answer alone): on smollm2-135m
# q4a8, 2 busy cores, 8 answers at once gave about 2x the tokens/s of one at a time
GEN_BATCH = 8
# the dev questions `veridraft bench --limit N` picks for any N up to this are never trained on
# (they are what the benchmark measures): 21 of 40 per Spec-Bench group, 22 of the 80 MT-Bench
HELD_OUT_LIMIT = 8
# novel passages as prompts: about this many characters each, at most this many per chapter
PASSAGE_CHARS = 1200
PASSAGES_PER_CHAPTER = 2
NOVEL_TASKS = (
    "Continue the story from where this passage ends:",
    "Summarise this passage in a few sentences:",
    "Who are the characters in this passage, and what does each want?",
)
SHARD = re.compile(r"^shard-(\d+)-(\d+)-(\d+)\.pt$")


def home() -> Path:
    return Path(os.environ.get("VERIDRAFT_HOME", "~/.cache/veridraft")).expanduser()


def spec_bench_dev_path() -> Path:
    """The Spec-Bench dev questions shipped in the package (the benchmark's other split is
    held out and never trained on)."""
    return Path(__file__).resolve().parents[1] / "bench" / "data" / "spec_bench_dev.jsonl"


@dataclass
class Corpus:
    name: str
    kind: str  # "code": windows of source files; "chat": prompts answered by the target
    items: list = field(default_factory=list)  # file paths or prompt texts
    digest: str = ""


def _digest(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:12]


def _py_files(root: Path, skip_tests: bool) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if skip_tests and any(part in ("test", "tests", "idle_test") for part in rel):
            continue
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        out.append(p)
    return out


def dev_questions(path: Path | None = None) -> list[tuple[dict, bool]]:
    """The Spec-Bench dev rows, each with whether the benchmark may measure on it (held out):
    picked by `veridraft bench --limit N` for some N <= HELD_OUT_LIMIT."""
    path = path or spec_bench_dev_path()
    if not path.is_file():
        raise VeridraftError(f"{path} is missing; reinstall veridraft or pass --corpus FILE")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        cat = r["category"]
        groups.setdefault(group_of(cat), []).append(i)
    held: set[int] = set()
    for idx in groups.values():
        for n in range(1, HELD_OUT_LIMIT + 1):
            held.update(idx[j] for j in _spread(len(idx), n))
    return [(r, i in held) for i, r in enumerate(rows)]


def dev_prompts() -> list[str]:
    """The first turns of the dev questions the benchmark never measures on."""
    return [str(r["turns"][0]) for r, held in dev_questions() if not held]


def novel_prompts() -> list[str]:
    """Passages of the novels shipped with veridraft, each behind an instruction (continue,
    summarise, name the characters, in turn): chat prompts in plain English prose."""
    from ..data.books import SHIPPED, read_lines

    if not SHIPPED.is_file():
        raise VeridraftError(f"{SHIPPED} is missing; reinstall veridraft or pass --corpus FILE")
    out = []
    for line in read_lines(SHIPPED):
        if not line.strip():
            continue
        for ch in json.loads(line)["chapters"]:
            paras = [p.strip() for p in ch["text"].split("\n\n") if p.strip()]
            taken, cur = 0, ""
            for para in paras:
                cur = f"{cur}\n\n{para}" if cur else para
                if len(cur) >= PASSAGE_CHARS:
                    task = NOVEL_TASKS[len(out) % len(NOVEL_TASKS)]
                    out.append(f"{task}\n\n{cur}")
                    taken, cur = taken + 1, ""
                    if taken == PASSAGES_PER_CHAPTER:
                        break
    return out


def _interleave(a: list, b: list) -> list:
    out = []
    for i in range(max(len(a), len(b))):
        out += a[i : i + 1] + b[i : i + 1]
    return out


def _prompts_jsonl(path: Path) -> list[str]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise VeridraftError(f"{path}, line {n}: not JSON; one prompt per line") from None
        if isinstance(row, str):
            out.append(row)
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
            out.append(row["prompt"])
        elif isinstance(row, dict) and row.get("turns"):
            out.append(str(row["turns"][0]))
        else:
            raise VeridraftError(
                f'{path}, line {n}: expected a string, {{"prompt": ...}} or {{"turns": [...]}}'
            )
    return out


CHAT_CORPORA = ("spec-bench-dev", "novels", "chat-mix")


def find_corpus(spec: str) -> Corpus:
    """`stdlib` (this interpreter's standard library, tests left out), `spec-bench-dev` (the
    shipped dev questions the benchmark does not measure on, answered by the target), `novels`
    (passages of the shipped novels behind an instruction, answered by the target), `chat-mix`
    (the two interleaved), a folder of .py files or a JSONL of prompts."""
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _py_files(root, skip_tests=True)
        ver = f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
        return Corpus("stdlib", "code", files, _digest([f"stdlib {ver}", str(len(files))]))
    if spec in CHAT_CORPORA:
        if spec == "spec-bench-dev":
            prompts = dev_prompts()
        elif spec == "novels":
            prompts = novel_prompts()
        else:
            prompts = _interleave(dev_prompts(), novel_prompts())
        return Corpus(spec, "chat", prompts, _digest(prompts))
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _py_files(path, skip_tests=False)
        if not files:
            raise VeridraftError(f"--corpus {spec}: no .py files under it")
        sig = [f"{p.relative_to(path)}:{p.stat().st_size}" for p in files]
        return Corpus(path.name, "code", files, _digest(sig))
    if path.is_file():
        prompts = _prompts_jsonl(path)
        if not prompts:
            raise VeridraftError(f"--corpus {spec}: no prompts in it")
        return Corpus(path.stem, "chat", prompts, _digest(prompts))
    raise VeridraftError(
        f"--corpus {spec!r} is neither stdlib, spec-bench-dev, novels, chat-mix, a folder of .py "
        "files nor a JSONL of prompts"
    )


@dataclass
class Sample:
    ids: torch.Tensor  # [T] int32
    aux: torch.Tensor  # [T, 3D] bfloat16
    top_ids: torch.Tensor  # [T, K] int32
    top_p: torch.Tensor  # [T, K] float16
    mask: torch.Tensor  # [T] bool: the next token of this position counts


@torch.inference_mode()
def target_features(net, ids: list[int], layers: tuple[int, ...], mask: list[bool]) -> Sample:
    """One sample's features: the target runs `ids` once, in chunks, capturing `layers`."""
    cache = net.new_cache(len(ids))
    aux, tid, tp = [], [], []
    for a in range(0, len(ids), CHUNK):
        cap = Capture(hidden_layers=layers)
        logits = net(torch.tensor(ids[a : a + CHUNK]), cache, capture=cap)
        aux.append(torch.cat([cap.hidden[i] for i in layers], -1).to(torch.bfloat16))
        top = torch.softmax(logits.float(), -1).topk(TOP_K, -1)
        tid.append(top.indices.int())
        tp.append(top.values.half())
    return Sample(
        ids=torch.tensor(ids, dtype=torch.int32),
        aux=torch.cat(aux),
        top_ids=torch.cat(tid),
        top_p=torch.cat(tp),
        mask=torch.tensor(mask, dtype=torch.bool),
    )


def _chat_prompt(model, prompt: str, answer_tokens: int) -> list[int]:
    tok = model.tokenizer
    if getattr(tok, "has_chat_template", False):
        pids = tok.encode_chat([{"role": "user", "content": prompt}])
    else:
        pids = tok.encode(prompt)
    return pids[-(model.context_length - answer_tokens - 1) :]


def _chat_ids(model, prompt: str, answer_tokens: int) -> tuple[list[int], int]:
    """The prompt in the chat template and the target's greedy answer (plain decoding)."""
    from ..decode import decode
    from ..sampling import SamplingParams

    pids = _chat_prompt(model, prompt, answer_tokens)
    eos = set(model.net.config.eos_token_ids or [])
    new, _ = decode(
        model.net,
        pids,
        max_new_tokens=answer_tokens,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        eos_ids=eos,
    )
    return pids + new, len(pids)


def chat_answers(model, prompts: list[str], answer_tokens: int) -> list[tuple[list[int], int]]:
    """`_chat_ids` of several prompts at once: the answers are generated together
    (`generate_batch`), each bitwise what plain decoding gives it alone."""
    from ..generate import generate_batch

    pids = [_chat_prompt(model, p, answer_tokens) for p in prompts]
    eos = list(model.net.config.eos_token_ids or [])
    out = generate_batch(
        model, pids, max_new_tokens=answer_tokens, eos_ids=eos, max_num_seqs=len(pids)
    )
    return [(p + new, len(p)) for p, (new, _) in zip(pids, out)]


def _chat_sample(ids: list[int], p: int):
    # position s predicts ids[s + 1]: the answer's tokens are predicted from p - 1 on
    return ids, [s >= p - 1 and s < len(ids) - 1 for s in range(len(ids))]


def _samples(model, corpus: Corpus, item, answer_tokens: int, seq_len: int):
    """(ids, loss mask) pairs of one corpus item."""
    if corpus.kind == "chat":
        yield _chat_sample(*_chat_ids(model, item, answer_tokens))
        return
    try:
        text = Path(item).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return
    ids = model.tokenizer.encode(text)[: FILE_WINDOWS * seq_len]
    for a in range(0, len(ids), seq_len):
        w = ids[a : a + seq_len]
        if len(w) >= 16:
            yield w, [True] * (len(w) - 1) + [False]


def feature_dir(model, corpus: Corpus, layers: tuple[int, ...], answer_tokens: int) -> Path:
    key = _digest(
        [
            corpus.digest,
            str(layers),
            str(TOP_K),
            str(SEQ_LEN),
            str(FILE_WINDOWS),
            str(answer_tokens),
        ]
    )
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name)
    return home() / "features" / f"{slug}-{model.precision}-{corpus.name}-{key}"


def shards(folder: Path) -> list[tuple[int, int, int, Path]]:
    """(index, first item, end item, path) of the whole shards in folder, in order."""
    out = []
    for p in folder.glob("shard-*.pt"):
        m = SHARD.match(p.name)
        if m:
            out.append((int(m[1]), int(m[2]), int(m[3]), p))
    return sorted(out)


def load_samples(folder: Path) -> list[Sample]:
    out: list[Sample] = []
    for *_, p in shards(folder):
        out.extend(Sample(**d) for d in torch.load(p, weights_only=True))
    return out


def count_tokens(folder: Path) -> int:
    return sum(int(s.ids.numel()) for s in load_samples(folder))


def compute(
    model,
    corpus: Corpus,
    layers: tuple[int, ...],
    *,
    max_tokens: int | None,
    answer_tokens: int = 192,
    seq_len: int = SEQ_LEN,
    log=print,
    progress: bool = True,
    gen_batch: int = GEN_BATCH,
) -> tuple[Path, float]:
    """Compute (or continue computing) the corpus's features; returns (folder, seconds spent
    now). Stops after the item (chat: the group of gen_batch items answered together) that
    reaches max_tokens."""
    from tqdm import tqdm

    folder = feature_dir(model, corpus, layers, answer_tokens)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model.name,
        "precision": model.precision,
        "corpus": corpus.name,
        "kind": corpus.kind,
        "layers": list(layers),
        "top_k": TOP_K,
        "items": len(corpus.items),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    done = shards(folder)
    next_item = done[-1][2] if done else 0
    have = sum(int(s.ids.numel()) for s in load_samples(folder)) if done else 0
    index = done[-1][0] + 1 if done else 0
    if done:
        log(f"features: continuing at item {next_item} ({have} tokens in {len(done)} shards)")
    t0 = time.perf_counter()
    limit = max_tokens if max_tokens else None
    bar = tqdm(
        total=limit if limit else len(corpus.items),
        initial=min(have, limit) if limit else next_item,
        unit="tok" if limit else "item",
        desc="features",
        disable=not progress,
        dynamic_ncols=True,
    )
    pending: list[dict] = []
    pend_tokens, first = 0, next_item

    def flush(end: int) -> None:
        nonlocal pending, pend_tokens, index, first
        if not pending:
            first = end
            return
        path = folder / f"shard-{index:05d}-{first}-{end}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(pending, tmp)
        tmp.replace(path)
        index += 1
        pending, pend_tokens, first = [], 0, end

    end = next_item  # the first item not yet in pending or a shard
    last = time.perf_counter()
    step = max(1, gen_batch) if corpus.kind == "chat" else 1
    try:
        for i in range(next_item, len(corpus.items), step):
            if limit and have >= limit:
                break
            if corpus.kind == "chat":
                items = corpus.items[i : i + step]
                pairs = [_chat_sample(*a) for a in chat_answers(model, items, answer_tokens)]
            else:
                pairs = list(_samples(model, corpus, corpus.items[i], answer_tokens, seq_len))
            got = [target_features(model.net, ids, layers, mask).__dict__ for ids, mask in pairs]
            n_item = sum(int(d["ids"].numel()) for d in got)
            pending.extend(got)  # whole items only: a stop inside one loses just that group
            end = min(i + step, len(corpus.items))
            have += n_item
            pend_tokens += n_item
            bar.update(min(n_item, limit - bar.n) if limit else end - i)
            bar.set_postfix(tokens=have)
            if pend_tokens >= SHARD_TOKENS or time.perf_counter() - last > SHARD_SECONDS:
                flush(end)
                last = time.perf_counter()
    finally:
        flush(end)  # Ctrl-C keeps the finished items
        bar.close()
    return folder, time.perf_counter() - t0
