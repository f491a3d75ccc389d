"""Shared by the drafter tests: tiny random models, exact distributions, chi-square, and the
Spec-Bench prompts used for the real-model exact-match checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from scipy import stats as sps

from veridraft.bench.questions import default_questions_path
from veridraft.decode import decode
from veridraft.models import from_folder
from veridraft.sampling import SamplingParams, probs

DEV = default_questions_path()
TINY_VOCAB = 16
# a prompt in which every id of the tiny vocabulary occurs
PROMPT = [3, 7, 1, 9, 12, 4, 3, 7, 1, 0, 2, 5, 6, 8, 10, 11, 13, 14, 15]
SAMPLING = SamplingParams(temperature=1.0)
ACCEPT_P = 1e-3  # a correct rule must not be rejected at this level (fixed seeds: no flakiness)
REJECT_P = 1e-6  # a wrong rule must be rejected at least this strongly


def tiny_llama(
    folder: Path,
    seed: int = 0,
    layers: int = 4,
    vocab: int = TINY_VOCAB,
    tie: bool = False,
    positions: int = 128,
    init_range: float = 0.25,
):
    """A random Llama with peaked-enough next-token distributions for statistical tests
    (`tie`: the head shares the embedding table, as in both catalog models; `init_range` 0.02,
    transformers' default, gives flat ones)."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        initializer_range=init_range,
        tie_word_embeddings=tie,
    )
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.generation_config.eos_token_id = None
    hf.save_pretrained(folder)
    return from_folder(folder)


def count_trees(drafter) -> dict[str, int]:
    """Counts the tree proposals of `drafter` in the returned dict's "trees", so that a test
    knows trees were verified. Its own propose is wrapped in place: the decode loop still sees
    the drafter itself, with all its attributes."""
    counts = {"trees": 0}
    inner = drafter.propose

    def propose(ctx, max_tokens):
        d = inner(ctx, max_tokens)
        counts["trees"] += d.parents is not None
        return d

    drafter.propose = propose
    return counts


def exact_joint(net, prompt: list[int], n: int, sampling: SamplingParams) -> np.ndarray:
    """P(first n generated tokens) as an array of shape [V] * n (exhaustive, tiny V only)."""
    v = net.config.vocab_size
    cache = net.new_cache(len(prompt) + n)
    first = net(torch.tensor(prompt), cache, num_logits=1)[-1]
    joint = np.zeros([v] * n)

    def extend(prefix: tuple[int, ...], logits: torch.Tensor, pr: float) -> None:
        row = probs(logits, sampling).double().numpy()
        depth = len(prefix)
        for t in np.nonzero(row)[0]:
            seq = prefix + (int(t),)
            if depth + 1 == n:
                joint[seq] = pr * row[t]
            else:
                cache.truncate(len(prompt) + depth)
                nxt = net(torch.tensor([int(t)]), cache)[-1]
                extend(seq, nxt, pr * row[t])

    extend((), first, 1.0)
    return joint


def sample_first(
    net,
    prompt: list[int],
    drafter,
    n_samples: int,
    n_tokens: int,
    sampling,
    seed: int,
    max_new_tokens: int = 6,
) -> np.ndarray:
    """Counts of the first n_tokens generated ids (flattened index over V**n_tokens)."""
    v = net.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(v**n_tokens, dtype=np.int64)

    def stop(new):
        return n_tokens if len(new) >= n_tokens else None

    for _ in range(n_samples):
        new, _ = decode(
            net,
            prompt,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            generator=g,
            drafter=drafter,
            should_stop=stop,
        )
        idx = 0
        for t in new[:n_tokens]:
            idx = idx * v + t
        counts[idx] += 1
    return counts


def chi2_pvalue(counts, expected_p) -> float:
    """Goodness of fit of counts to expected_p; cells with p = 0 must be empty (else 0.0).
    Cells expecting fewer than 5 draws are pooled into one."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    expected_p = np.asarray(expected_p, dtype=np.float64).ravel()
    n = counts.sum()
    if counts[expected_p <= 0].sum() > 0:
        return 0.0
    exp = expected_p * n
    big = exp >= 5
    obs = list(counts[big])
    e = list(exp[big])
    small = (~big) & (expected_p > 0)
    if small.any():
        obs.append(counts[small].sum())
        e.append(exp[small].sum())
    if len(obs) == 1:  # all the mass in one cell, nothing outside it: a perfect fit
        return 1.0
    e = np.asarray(e)
    e *= sum(obs) / e.sum()  # exact normalisation for scipy
    return float(sps.chisquare(obs, e).pvalue)


def dev_questions(per_category: dict[str, int]) -> list[dict]:
    """The first k questions of each named category of the Spec-Bench dev file."""
    rows = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()]
    out = []
    for cat, k in per_category.items():
        out.extend([r for r in rows if r["category"] == cat][:k])
    return out


def prompt_ids(model, question: dict, max_tokens: int = 300) -> list[int]:
    """First turn as the model sees it (chat template when it has one). A long user text is
    trimmed to about max_tokens ids - its head (instruction, start of the document) and its tail
    (a trailing question) - so that the real-model tests stay fast."""
    tok = model.tokenizer
    text = question["turns"][0]
    body = tok.encode(text, add_special_tokens=False)
    if len(body) > max_tokens:
        head, tail = (2 * max_tokens) // 3, max_tokens // 3
        text = tok.decode(body[:head]) + " ... " + tok.decode(body[-tail:])
    if tok.has_chat_template:
        return tok.encode_chat([{"role": "user", "content": text}])
    return tok.encode(text)


def small_head_config(**kw):
    """An EAGLE-3 head config of a few thousand parameters (4 query heads over 2 KV heads of 8,
    a 24-id draft vocabulary over 40 ids by default): the head tests' shared shape."""
    from veridraft.drafters.eagle import HeadConfig

    shape = dict(
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=40,
        draft_vocab_size=24,
        target_hidden_size=32,
        aux_ids=(1, 2, 3),
    )
    return HeadConfig(**{**shape, **kw})


class Shadow:
    """A drafter that decodes with `main` while `ref` gets the same calls (prefill, update,
    propose) and drafts from the same state: counts the rounds, those whose drafts differ and
    those that drafted a tree."""

    def __init__(self, main, ref) -> None:
        self.main, self.ref = main, ref
        self.prompt_capture, self.verify_capture = main.prompt_capture, main.verify_capture
        self.rounds = self.differ = self.branched = 0

    def prefill(self, ctx) -> None:
        self.main.prefill(ctx)
        self.ref.prefill(ctx)

    def update(self, rnd) -> None:
        self.main.update(rnd)
        self.ref.update(rnd)

    def propose(self, ctx, max_tokens: int):
        d, r = self.main.propose(ctx, max_tokens), self.ref.propose(ctx, max_tokens)
        self.rounds += 1
        self.differ += (d.tokens, d.parents) != (r.tokens, r.parents)
        self.branched += d.parents is not None
        return d


class CountedNet:
    """A network that records the rows of each forward it runs (a draft model's, say)."""

    def __init__(self, net):
        self.net, self.rows = net, []

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x, cache, **kw):
        self.rows.append(int(x.shape[0]))
        return self.net(x, cache, **kw)
