"""A cheaper head for drafting: logits over a subset of the vocabulary.

On small models the output head is a large share of a forward (smollm2-135m: 28M of 134M
weights; gemma3-270m: 168M of 268M), and a draft step pays for all of it. `SubsetHead` scores
only the first `n` ids (BPE and SentencePiece vocabularies put frequent pieces first) plus every
id already present in the context (the prompt and the generated text), so a draft step reads a
fraction of the head.

Still lossless: only the draft changes. Greedy drafts are the argmax over the subset (point
masses); sampled drafts come from `probs()` of the subset logits (-inf elsewhere), and that q,
zero outside the subset, is what the verifier receives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import VeridraftError
from ..models.base import Capture
from ..sampling import SamplingParams, probs, sample

AUTO_DRAFT_VOCAB = 16384  # draft_vocab="auto": this many first ids, for vocabularies >= 2x


def resolve_draft_vocab(method: str, value, net) -> int:
    """draft_vocab parameter -> the number of first ids to score (0 = the full head).

    "auto" (the default): AUTO_DRAFT_VOCAB when the vocabulary is at least twice that size and
    the head's weights are reachable, else 0. Measured with layerskip (greedy, 48 tokens x 6
    Spec-Bench prompts, acceptance exact, draft cost from weight counts): gemma3-270m (head =
    62% of the weights) skip=8-9 from est. 0.71x to 1.43x; smollm2-135m (21%) skip=14-15 from
    0.95x to 1.03x, with alpha 0.88 -> 0.84 (4096 ids: 0.76, 8192: 0.82).
    """
    from .params import as_int

    if isinstance(value, str) and value.strip().lower() == "auto":
        vocab = net.config.vocab_size
        reachable = head_weight(net) is not None or _q4_head(net) is not None
        if vocab >= 2 * AUTO_DRAFT_VOCAB and reachable:
            return AUTO_DRAFT_VOCAB
        return 0
    return as_int(method, "draft_vocab", value, lo=0)


def _q4_head(net):
    """The output linear of a q4 model when its rows can be viewed without a copy (veridraft's
    kernel, no bias, one block type), else None."""
    from ..models.q4 import Q4Linear

    out = getattr(net, "output", None)
    if isinstance(out, Q4Linear) and out.bias is None and out.rows_view(0, 16) is not None:
        return out
    return None


def head_weight(net) -> Tensor | None:
    """The [vocab, dim] output matrix when it is reachable as a tensor (fp32 heads; tied heads
    through the embedding table in every precision; untied packed heads read back once)."""
    from ..models.precision import PackedLinear

    out = getattr(net, "output", None)
    w = getattr(out, "weight", None)
    if isinstance(w, Tensor) and w.dim() == 2 and not isinstance(out, PackedLinear):
        return w
    if getattr(net.config, "tie_embeddings", False):
        return net.tok_embeddings.weight
    if isinstance(out, PackedLinear) and (out.bias is None or w is not None):
        if getattr(out, "unpacked", None) is None:
            # a PackedLinear keeps its 16-bit tensor where oneDNN cannot prepack (no
            # AVX512-BF16), its inner dimension padded to whole tiles: a view of it will do
            out.unpacked = _read_back(out) if w is None else w[:, : out.in_features]
        return out.unpacked
    return None


@torch.inference_mode()
def _read_back(lin, rows: int = 128) -> Tensor:
    """The 16-bit weights of a packed linear without bias, [out, in], as its own kernel sees
    them: the identity through the layer gives W^T exactly (each output is one weight times 1,
    accumulated in float32, and already a 16-bit value). An untied 16-bit head (the 0.5B Qwen
    draft's is 27% of its weights) then gets the subset head as a tied one does; it costs one
    16-bit copy of the head."""
    half = torch.float16 if lin.precision == "fp16w" else torch.bfloat16
    w = torch.empty(lin.out_features, lin.in_features, dtype=half)
    for i in range(0, lin.in_features, rows):
        eye = torch.eye(lin.in_features)[i : i + rows]
        w[:, i : i + eye.shape[0]] = lin(eye).T.to(half)
    return w


class SubsetHead:
    def __init__(self, net, n_first: int, target_vocab: int | None = None) -> None:
        q4 = _q4_head(net)
        w = None if q4 is not None else head_weight(net)
        if w is None and q4 is None:
            raise VeridraftError(
                f"draft_vocab: the head of this model is not reachable in precision "
                f"{getattr(net, 'precision', '?')} (untied and packed); use draft_vocab=0"
            )
        self.w = w
        rows, dim = (q4.out_features, q4.in_features) if q4 is not None else w.shape
        self.rows = rows
        self.vocab = target_vocab or rows
        self.n = min(n_first, rows, self.vocab)
        precision = getattr(net, "precision", "fp32")
        if q4 is not None:
            # the q4 head's own codes: its first rows are a view, other rows read back one at a
            # time (a float32 copy of 16384 rows would read 4x the bytes)
            self.n = max(16, self.n // 16 * 16)
            self.base = q4.rows_view(0, self.n)
            self._row = q4.row
        elif precision in ("fp16w", "bf16"):
            base = w[: self.n]
            # the target's own kernel: a float32 copy of 16384 rows reads twice the bytes, and
            # more than the packed full head of smollm2-135m does
            from ..models.precision import PackedLinear

            self.base = PackedLinear(base.float(), None, precision)
        else:
            base = w[: self.n]
            self.base = base.float() if base.dtype != torch.float32 else base
        if q4 is None:
            self._row = lambda t: self.w[t].float()
        self.extra = torch.empty(256, dim)
        self.extra_ids: list[int] = []
        self._known: set[int] = set()
        self.softcap = getattr(net.config, "final_logit_softcapping", None)
        self._seen = 0
        self._ids_obj = None

    def reset(self) -> None:
        self.extra_ids.clear()
        self._known.clear()
        self._seen = 0
        self._ids_obj = None

    def observe(self, ids: list[int]) -> None:
        """Add the ids of the context not covered yet (call with the growing ctx.ids)."""
        if ids is not self._ids_obj or len(ids) < self._seen:
            self.reset()
            self._ids_obj = ids
        limit = min(self.vocab, self.rows)
        for t in ids[self._seen :]:
            if self.n <= t < limit and t not in self._known:
                self._known.add(t)
                e = len(self.extra_ids)
                if e == self.extra.shape[0]:
                    grown = torch.empty(2 * e, self.extra.shape[1])
                    grown[:e] = self.extra
                    self.extra = grown
                self.extra[e] = self._row(t)
                self.extra_ids.append(t)
        self._seen = len(ids)

    def logits(self, h: Tensor) -> Tensor:
        """Subset logits for one hidden row h [dim]: [n + len(extra_ids)]."""
        if isinstance(self.base, torch.Tensor):
            out = self.base @ h
        else:
            out = self.base(h[None])[0]
        if self.extra_ids:
            out = torch.cat((out, self.extra[: len(self.extra_ids)] @ h))
        if self.softcap is not None:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    def token(self, index: int) -> int:
        return index if index < self.n else self.extra_ids[index - self.n]

    def full(self, sub: Tensor) -> Tensor:
        """Subset logits scattered into a [vocab] row, -inf elsewhere."""
        row = torch.full((self.vocab,), float("-inf"))
        row[: self.n] = sub[: self.n]
        if self.extra_ids:
            row[torch.tensor(self.extra_ids)] = sub[self.n :]
        return row


def draft_step(
    net,
    tokens: list[int],
    cache,
    *,
    skip=None,
    head: SubsetHead | None,
    sampling: SamplingParams,
    sampled: bool,
    generator: torch.Generator | None,
    target_vocab: int | None = None,
    view=None,
    alts: int = 0,
    alt_out: list | None = None,
) -> tuple[int, float, Tensor | None]:
    """One draft forward of `tokens` (usually one id; more when a drafter catches up): (next
    draft token, its draft probability, q or None).

    The probability is the softmax of the raw draft logits at the chosen token (the confidence
    that Draft & Verify and HF's assistant threshold compare); q is `probs()` of the draft logits
    under `sampling` when `sampled`, else None (argmax, a point mass). view: the forward's
    `view=` (a sparse draft context). With `alts` > 0 and greedy drafting, the next `alts` most
    likely tokens and their draft probabilities are appended to `alt_out` as (token, prob)
    pairs (the siblings of a top-k token tree).
    """
    x = torch.tensor(tokens, dtype=torch.long)
    if head is None:
        logits = net(x, cache, skip=skip, view=view, num_logits=1)[-1]
        if target_vocab is not None and logits.shape[-1] != target_vocab:
            logits = _fit(logits, target_vocab)
        if sampled:
            q = probs(logits, sampling)
            tok = sample(q, generator)
        else:
            q = None
            tok = int(logits.argmax())
        conf = float(torch.exp(logits[tok] - torch.logsumexp(logits, -1)))
        if alts and not sampled and alt_out is not None:
            _alternatives(logits, alts, alt_out, None)
        return tok, conf, q
    cap = Capture(hidden_layers=(-1,))
    net(x, cache, skip=skip, view=view, capture=cap, num_logits=0)
    sub = head.logits(cap.hidden[-1][-1])
    if sampled:
        q = probs(head.full(sub), sampling)
        tok = sample(q, generator)
        idx = None
    else:
        q = None
        idx = int(sub.argmax())
        tok = head.token(idx)
    if idx is None:
        row = head.full(sub)
        conf = float(torch.exp(row[tok] - torch.logsumexp(sub, -1)))
    else:
        conf = float(torch.exp(sub[idx] - torch.logsumexp(sub, -1)))
        if alts and alt_out is not None:
            _alternatives(sub, alts, alt_out, head)
    return tok, conf, q


def _alternatives(logits: Tensor, alts: int, out: list, head: SubsetHead | None) -> None:
    """The ranks 2 .. alts + 1 of `logits` as (token, softmax probability)."""
    top = logits.topk(min(alts + 1, logits.shape[-1]))
    p = torch.exp(top.values - torch.logsumexp(logits, -1)).tolist()
    for i, pr in zip(top.indices.tolist()[1:], p[1:]):
        out.append((head.token(i) if head is not None else int(i), pr))


def _fit(logits: Tensor, v: int) -> Tensor:
    """Draft logits cut or padded (-inf) to the target's vocabulary size (same tokenizer,
    padded embedding tables)."""
    if logits.shape[-1] > v:
        return logits[:v]
    return torch.cat((logits, logits.new_full((v - logits.shape[-1],), float("-inf"))))
