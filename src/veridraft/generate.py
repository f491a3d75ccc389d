"""`generate()` (text in, text out) and `generate_ids()` (ids in, ids out): the public entry
points, HF-style keywords on top of `decode`. Every caller of the decode loop goes through
`generate_ids`: it builds the sampling settings, the generator, the drafter (with the resources
drafters may use, `draft_env`) and the stop rules in one place.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import drafters, presses
from .auto import AUTO, LONG_PROMPT, pick_draft
from .batch import Batcher, DraftPlanner, Request, run_all
from .decode import PREFILL_CHUNK, Prefill, decode, prefill
from .draft import DraftEnv, Drafter
from .errors import VeridraftError
from .rules import make_rule, split_method
from .sampling import SamplingParams
from .stats import Stats
from .verify import Rule
from .vision.chat import (
    MultimodalPrompt,
    check_drafter,
    has_media,
    prepare,
    require_multimodal,
    vision_prompt,
)

Messages = list[dict]

# draft= values that mean plain decoding (None too)
NO_DRAFT = ("none", "ar", "")


@dataclass
class Generation:
    ids: list[int]  # generated ids only (EOS included when it ended the text)
    text: str  # generated text, special tokens removed, cut before a stop string
    stats: Stats
    prompt_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "eos" | "stop" | "length"

    def __str__(self) -> str:
        return self.text


def prompt_ids_for(model, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Token ids for a raw prompt or chat messages.

    Messages use the model's chat template when it has one; a base model gets the contents
    joined as raw text. A string is raw text unless chat=True (then it becomes one user turn).
    """
    tok = model.tokenizer
    if isinstance(prompt, str):
        if chat and tok.has_chat_template:
            return tok.encode_chat([{"role": "user", "content": prompt}])
        return tok.encode(prompt)
    if not isinstance(prompt, list) or not all(
        isinstance(m, dict) and "content" in m for m in prompt
    ):
        raise VeridraftError(
            "prompt must be a string or a list of {'role': ..., 'content': ...} messages"
        )
    if tok.has_chat_template and chat is not False:
        return tok.encode_chat(prompt)
    return tok.encode("\n\n".join(m["content"] for m in prompt))


def draft_env(model) -> DraftEnv:
    """The resources drafters get for `model`: the loader, the tuned profiles, the cost model
    (read once per DraftEnv: a caller that reuses one env does no file I/O per generation)."""
    costs: dict[int, object] = {}

    def load(name: str, precision: str | None):
        from .loader import load

        return load(name, precision=precision or "fp32")

    def knows(name: str) -> bool:
        from .models import catalog

        return name in catalog.CATALOG or Path(name).expanduser().exists()

    def profile(target, spec: str | None):
        from .profiles import profile_for

        return profile_for(target, spec)

    def cost(target):
        from .costmodel import load_cost

        if id(target) not in costs:
            costs[id(target)] = load_cost(target) if hasattr(target, "path") else None
        return costs[id(target)]

    def datastore(name: str, target):
        from .datastore import load as load_store

        return load_store(name, getattr(target, "tokenizer", None))

    return DraftEnv(load=load, knows=knows, profile=profile, cost=cost, datastore=datastore)


_WARNED: set[str] = set()


def slowdown_warning(drafter, model, env: DraftEnv | None = None) -> str | None:
    """Why `drafter` is expected to make generation slower than plain decoding on this machine
    (its tuned profile measured a slowdown, or the cost model says no acceptance rate pays), or
    None when nothing says so."""
    if drafter is None:
        return None
    reason = getattr(drafter, "expected_slowdown", None)
    if reason:
        return reason
    env = env or draft_env(model)
    cost = env.cost(model) if env.cost is not None else None
    key = getattr(drafter, "cost_key", None)
    step = cost.draft_cost(key) if cost is not None and key else None
    if step is not None and cost.speedup(1.0, 1, step) < 1.0:
        # even a draft that is always right: one draft step + a 2-position verification costs
        # more than two plain steps
        return (
            f"{drafter.name}: the cost model of this machine ({cost.precision}) says a draft step "
            f"costs {step:.2f} of a target forward, more than any acceptance rate can repay; "
            "plain decoding (no draft) is faster"
        )
    return None


def long_prompt_warning(drafter, model, prompt_tokens: int) -> str | None:
    """Why a tree drafter may be slower than plain decoding on a long prompt: nothing sizes its
    trees for the context (no cost profile measured at long contexts, no nodes=), or None."""
    if drafter is None or prompt_tokens < LONG_PROMPT or not getattr(drafter, "unsized_trees", 0):
        return None
    name = getattr(model, "name", None) or "MODEL"
    precision = getattr(model, "precision", None) or "fp32"
    k = -(-prompt_tokens // 1024)
    return (
        f"{drafter.name}: no cost profile sizes its token trees on this machine, and at "
        f"{prompt_tokens} prompt tokens every tree node attends over the whole cache, so trees "
        "sized for short prompts can be slower than plain decoding; run `veridraft profile "
        f"--model {name} --precision {precision} --contexts 100,1000,{k}k` (or set nodes=)"
    )


def prefill_prompt(model, prompt_ids: Sequence[int], max_new_tokens: int, max_draft: int = 16):
    """Run a prompt through the target once; pass the result to `generate_ids(prefilled=...)`
    to generate from it repeatedly without paying the prefill again."""
    net = getattr(model, "net", model)
    return prefill(net, prompt_ids, len(prompt_ids) + max_new_tokens + max_draft + 1)


def generate_ids(
    model,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    draft: str | Drafter | None = None,
    eos_ids: Sequence[int] | None = None,
    should_stop: Callable[[list[int]], int | None] | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    max_draft: int = 16,
    prefilled: Prefill | None = None,
    env: DraftEnv | None = None,
    warn: bool = True,
    kv: str | presses.Press | None = None,
    verify: str | Rule | None = None,
    lossless: bool = False,
    segments: Sequence[tuple[str, int, int]] = (),
    prefill_chunk: int | None = PREFILL_CHUNK,
    **draft_options,
) -> tuple[list[int], Stats]:
    """Generate up to max_new_tokens ids after prompt_ids; return (new ids, stats).

    model: a LoadedModel (see `veridraft.load`) or a native network. sampling: a SamplingParams
    instead of temperature/top_k/top_p. seed or generator: the random source (neither: a fresh
    seed). draft: None / "none" (plain decoding), "auto" (`veridraft.auto`: the drafter expected
    to win for this prompt in this mode, else none; the choice is in stats.notes), a method spec
    or a Drafter instance; draft_options go to
    the drafter. eos_ids: ids that end generation (default: the tokenizer's EOS ids; () for
    none). should_stop(new_ids) -> ids to keep, or None to go on; on_tokens(ids) receives
    committed ids as they come. prefilled: from `prefill_prompt` for these prompt_ids.
    verify: the acceptance rule, None / "strict" (lossless) or "loose:..." (lossy, rules.py);
    lossless=True refuses a lossy rule.
    segments: (kind, start, end) parts of the prompt (veridraft.segments) for the drafter.
    prefill_chunk: prompt positions per prefill forward (bounds the prefill's memory; None:
    the whole prompt in one forward).
    A drafter expected to be slower than plain decoding here is used as asked, but said so once
    on stderr (warn=False: only in stats.warnings). kv: a KV-compression press spec such as
    "snapkv:budget=1024" (lossy; see veridraft.presses): the target decodes on a compacted cache,
    and a drafter is verified against that compressed target.
    """
    if sampling is None:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    elif (temperature, top_k, top_p) != (0.0, 0, 1.0):
        raise VeridraftError("pass either sampling= or temperature/top_k/top_p, not both")
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise VeridraftError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise VeridraftError("the prompt is empty")
    net = getattr(model, "net", model)
    tok = getattr(model, "tokenizer", None)
    ctx_len = getattr(getattr(net, "config", None), "max_position_embeddings", None)
    if ctx_len is not None and len(ids) + max_new_tokens > ctx_len:
        raise VeridraftError(
            f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"context length of {getattr(model, 'name', 'the model')} ({ctx_len}); shorten the "
            "prompt or lower max_new_tokens"
        )
    if generator is not None and seed is not None:
        raise VeridraftError("pass either seed= or generator=, not both")
    if generator is None:
        generator = torch.Generator()
        # Generator.seed() draws a fresh seed for this generator only: torch.seed() would
        # reseed the caller's global RNG as a side effect.
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()
    if eos_ids is None:
        eos_ids = getattr(tok, "eos_ids", None) or ()
    if isinstance(draft, str):  # "ngram+loose:topk=5": a drafter and a rule in one spec
        draft, rule_spec = split_method(draft)
        if rule_spec is not None:
            if verify is not None:
                raise VeridraftError(
                    f"the rule is given twice: {rule_spec!r} in draft= and {verify!r} in verify="
                )
            verify = rule_spec
    if isinstance(draft, str) and draft.strip().lower() in NO_DRAFT:
        draft = None
    vocab = getattr(getattr(net, "config", None), "vocab_size", None)
    rule = make_rule(verify, tok, vocab, lossless=lossless)
    env = env or draft_env(model)
    chosen: list[str] = []
    if isinstance(draft, str) and draft.strip().lower() == AUTO:
        if draft_options:
            raise VeridraftError(
                f"draft='auto' takes no drafter options (got {', '.join(draft_options)}); name "
                "the drafter, e.g. draft='suffix'"
            )
        cost = env.cost(model) if env.cost is not None else None
        choice = pick_draft(model, len(ids), cost, chain_only=rule.lossy)
        draft = choice.value
        chosen.append(choice.note("draft"))
    drafter = drafters.make_drafter(draft, model, env=env, **draft_options)
    reason = slowdown_warning(drafter, model, env) or long_prompt_warning(drafter, model, len(ids))
    if reason and warn and reason not in _WARNED:
        _WARNED.add(reason)
        print(f"veridraft: warning: {reason}", file=sys.stderr)
    press_s = 0.0
    if kv is not None:
        press = presses.make_press(kv)
        if lossless:
            raise VeridraftError(
                f"kv={press.spec()!r} is lossy KV compression and lossless=True was asked; "
                "drop one of them"
            )
        if prefilled is not None:
            raise VeridraftError("pass either kv= or prefilled=, not both")
        t0 = time.perf_counter()
        prefilled = presses.prefill_compressed(
            net, ids, len(ids) + max_new_tokens + max_draft + 1, press
        )
        press_s = time.perf_counter() - t0
    new, stats = decode(
        net,
        ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        generator=generator,
        drafter=drafter,
        eos_ids=frozenset(eos_ids),
        should_stop=should_stop,
        on_tokens=on_tokens,
        tokenizer=tok,
        max_draft=max_draft,
        prefilled=prefilled,
        rule=rule,
        segments=segments,
        prefill_chunk=prefill_chunk,
    )
    if kv is not None:
        stats.prefill_s += press_s
        stats.total_s += press_s
        stats.method += f"+kv:{press.spec()} (lossy)"
        stats.notes.append(presses.memory_note(prefilled.cache, net, press))
    if reason:
        stats.warnings.append(reason)
    if getattr(model, "chosen", ""):
        chosen.insert(0, model.chosen)
    stats.notes[:0] = chosen
    if drafter is not None:
        from .costmodel import explain

        cost = env.cost(model) if env.cost is not None else None
        stats.notes.extend(explain(stats, cost, getattr(drafter, "cost_key", None)))
    return new, stats


def generate(
    model,
    prompt: str | Messages,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    stream: Callable[[str], None] | None = None,
    draft: str | Drafter | None = AUTO,
    chat: bool | None = None,
    kv: str | None = None,
    verify: str | Rule | None = None,
    lossless: bool = False,
    **draft_options,
) -> Generation:
    """Generate text from a loaded model (see `veridraft.load`).

    draft: "auto" (the default: the drafter this machine's costs expect to win for this prompt
    and mode, else plain decoding; `veridraft.auto`), None or "none" (plain decoding), a method
    spec such as "suffix", "ngram:num_tokens=8", "layerskip", "model:NAME", or a Drafter
    instance; draft_options go to the drafter. What "auto" chose is in `stats.notes`.
    stream: called with each new piece of text as soon as it is final.
    kv: a KV-compression press (lossy), e.g. "snapkv:budget=1024" or "adakv:budget=0.25".
    verify: None / "strict" (lossless) or "loose:topk=5,lam=0.7,shift=2,anchor=content"
    (lossy loose verification, rules.py); lossless=True refuses a lossy rule.
    Messages holding images or videos ({"type": "image", "image": PATH}, {"type": "video",
    "video": PATH, "fps": 2.0} content items) run on a Qwen2-VL / Qwen2.5-VL model
    (`veridraft.multimodal`); a text-only model refuses them.
    """
    if int(max_new_tokens) != max_new_tokens or max_new_tokens < 1:
        raise VeridraftError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise VeridraftError("stop strings must be non-empty strings")
    if has_media(prompt):  # images or video: the vision-language path
        return generate_media(
            model,
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            stream=stream,
            draft=draft,
            chat=chat,
            kv=kv,
            verify=verify,
            lossless=lossless,
            **draft_options,
        )
    ids = prompt_ids_for(model, prompt, chat)
    tok = model.tokenizer
    segments: list = []
    if isinstance(prompt, list) and tok.has_chat_template and chat is not False:
        from .segments import encode_chat

        seg_ids, segments = encode_chat(tok, prompt)
        if seg_ids != ids:  # the same rendering; anything else would mark the wrong ids
            segments = []
    text_out = TextStream(tok, stops, stream)
    new, stats = generate_ids(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        draft=draft,
        kv=kv,
        should_stop=text_out.stop_point if stops else None,
        on_tokens=text_out.push if stream else None,
        verify=verify,
        lossless=lossless,
        segments=segments,
        **draft_options,
    )
    text, reason = text_out.final(new)
    if stream:
        text_out.flush(text)
    return Generation(ids=new, text=text, stats=stats, prompt_ids=ids, finish_reason=reason)


class TextStream:
    """Turns committed ids into text pieces, holding back what may still change: an incomplete
    UTF-8 sequence, or a tail that could be the start of a stop string."""

    def __init__(self, tok, stops: list[str], callback) -> None:
        self.tok, self.stops, self.callback = tok, stops, callback
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def _text(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> None:
        self.ids.extend(ids)
        text = self._text(self.ids)
        end = len(text) - self.hold
        # A complete stop string may sit inside the held-back window's left edge: never send
        # it, nor anything after it (the final text is cut there).
        hits = [
            i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stops) if i >= 0
        ]
        if hits:
            end = min(end, min(hits))
        while end > self.sent and text[end - 1] == "\ufffd":
            end -= 1
        if end > self.sent:
            self.callback(text[self.sent : end])
            self.sent = end

    def flush(self, final_text: str) -> None:
        if len(final_text) > self.sent:
            self.callback(final_text[self.sent :])
        self.sent = len(final_text)

    def stop_point(self, new: list[int]) -> int | None:
        text = self._text(new)
        hit = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit < 0:
            return None
        stop_end = min(text.find(s) + len(s) for s in self.stops if text.find(s) == hit)
        # Fewest ids whose text already contains the stop string.
        for n in range(1, len(new) + 1):
            if len(self._text(new[:n])) >= stop_end:
                return n
        return len(new)

    def final(self, new: list[int]) -> tuple[str, str]:
        text = self._text(new)
        for s in self.stops:
            i = text.find(s)
            if i >= 0:
                cut = min(i, *(text.find(t) for t in self.stops if text.find(t) >= 0))
                return text[:cut], "stop"
        if new and new[-1] in self.tok.eos_ids:
            return text, "eos"
        return text, "length"


_TextStream = TextStream  # its earlier name


def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seeds: Sequence[int | None] | None = None,
    draft: str | None = None,
    max_draft: int = 16,
    eos_ids: Sequence[int] | None = None,
    max_num_seqs: int = 8,
    kv_positions: int | None = None,
    cost=None,
    batched: bool | None = None,
    **draft_options,
) -> list[tuple[list[int], Stats]]:
    """Generate after each of `prompts` (ids) together; return (new ids, stats) per prompt, each
    bitwise what `generate_ids` gives that prompt alone with the same settings and seed.

    Every prompt gets its own drafter (draft=, draft_options as in generate_ids) and random
    source (seeds[i]; None: a fresh seed). max_num_seqs: sequences in a step at once (the
    others wait). kv_positions: the KV budget (default: room for max_num_seqs of the longest).
    cost: a costmodel.CostModel to size the drafts per step for the batch (sampled requests
    keep max_draft: their seed reproduces only with their solo draft lengths); None: every
    request drafts up to max_draft. batched: force (True) or refuse (False) shared forwards;
    None: shared in the row-invariant modes (bf16, q4, q4a8), interleaved otherwise.
    """
    net = getattr(model, "net", model)
    tok = getattr(model, "tokenizer", None)
    n = len(prompts)
    lens = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    seeds = [None] * n if seeds is None else list(seeds)
    if len(lens) != n or len(seeds) != n:
        raise VeridraftError("max_new_tokens and seeds need one value per prompt")
    if any(int(m) != m or m < 1 for m in lens):
        raise VeridraftError(f"max_new_tokens must be positive integers, got {lens}")
    if isinstance(draft, str) and draft.strip().lower() in NO_DRAFT:
        draft = None
    if eos_ids is None:
        eos_ids = getattr(tok, "eos_ids", None) or ()
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    env = draft_env(model)
    if kv_positions is None:
        longest = max(len(p) + m for p, m in zip(prompts, lens)) + max_draft + 1
        kv_positions = longest * min(n, max_num_seqs)
    planner = DraftPlanner(cost)
    b = Batcher(
        net, kv_positions=kv_positions, max_num_seqs=max_num_seqs, planner=planner,
        batched=batched,
    )  # fmt: skip
    entries = []
    for ids, m, seed in zip(prompts, lens, seeds):
        gen = torch.Generator()
        gen.manual_seed(seed) if seed is not None else gen.seed()
        drafter = drafters.make_drafter(draft, model, env=env, **draft_options)
        req = Request(
            prompt_ids=[int(i) for i in ids],
            max_new_tokens=int(m),
            sampling=sampling,
            generator=gen,
            drafter=drafter,
            max_draft=max_draft,
            adaptive=sampling.greedy,
            eos_ids=frozenset(eos_ids),
            tokenizer=tok,
        )
        entries.append(b.add(req))
    return run_all(b, entries)


# ---- images and video (Qwen2-VL / Qwen2.5-VL; `veridraft.multimodal` names these) ----

# generate_ids' own keywords; any other keyword is a drafter option
_GENERATE_KEYS = frozenset(
    {
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "sampling",
        "seed",
        "generator",
        "eos_ids",
        "should_stop",
        "on_tokens",
        "max_draft",
        "prefilled",
        "warn",
        "kv",
        "verify",
        "lossless",
        "prefill_chunk",
    }
)


def generate_prompt(
    model, mp: MultimodalPrompt, *, draft=None, env=None, **kw
) -> tuple[list[int], Stats]:
    """`generate_ids` for a prompt `vision.chat.prepare` made: (new ids, stats). `draft` is a
    method spec, a Drafter or None ("auto" is plain decoding: the cost model knows text prompts
    only); the other keywords are generate_ids' or the drafter's options."""
    net = require_multimodal(model)
    if isinstance(draft, str):
        draft, rule = split_method(draft)
        if rule is not None:
            if kw.get("verify") is not None:
                raise VeridraftError(f"the rule is given twice: {rule!r} in draft= and in verify=")
            kw["verify"] = rule
        if draft is None or draft.strip().lower() in (*NO_DRAFT, "auto"):
            draft = None
    env = env or draft_env(model)
    options = {k: kw.pop(k) for k in list(kw) if k not in _GENERATE_KEYS}
    spec = draft if isinstance(draft, str) else ""
    drafter = drafters.make_drafter(draft, model, env=env, **options)
    with ExitStack() as stack:
        stack.enter_context(net.use_prompt(mp.vision))
        for dnet in check_drafter(drafter, spec):
            if dnet is not net:  # a draft VLM sees the media through its own tower
                stack.enter_context(dnet.use_prompt(vision_prompt(dnet, mp.ids, mp.inputs)))
        return generate_ids(model, mp.ids, draft=drafter, env=env, segments=mp.segments, **kw)


def generate_media(
    model,
    messages: Sequence[dict[str, Any]],
    max_new_tokens: int = 128,
    *,
    stop: str | Sequence[str] | None = None,
    stream: Callable[[str], None] | None = None,
    chat: bool | None = None,
    **kw,
) -> Generation:
    """Text for chat messages with images and videos (a LoadedModel of a Qwen2-VL or
    Qwen2.5-VL model); `veridraft.generate` routes such messages here. stop and stream as in
    `veridraft.generate`; the other keywords are generate_ids' (draft, kv, verify, temperature,
    seed, ...) and the drafter's options."""
    if chat is False:
        raise VeridraftError(
            "chat=False joins the messages as raw text, which cannot carry images or video; "
            "leave chat unset for messages with media"
        )
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise VeridraftError("stop strings must be non-empty strings")
    mp = prepare(model, messages)
    text_out = TextStream(model.tokenizer, stops, stream)
    new, stats = generate_prompt(
        model,
        mp,
        max_new_tokens=max_new_tokens,
        should_stop=text_out.stop_point if stops else None,
        on_tokens=text_out.push if stream else None,
        **kw,
    )
    text, reason = text_out.final(new)
    if stream:
        text_out.flush(text)
    return Generation(ids=new, text=text, stats=stats, prompt_ids=mp.ids, finish_reason=reason)
