"""Universal drafting: a draft model with any tokenizer (TokenTiming / HF UAG), lossless.

    make_drafter("universal:smollm2-135m", gemma)                   # DTW, cost-aware k
    make_drafter("universal:smollm2-135m:align=lcd,k=6", gemma)     # fixed k = 6
    make_drafter("universal:NAME:mode=dynamic,k=12", model)         # confidence threshold
    make_drafter("universal:smollm2-135m:mode=fixed", gemma)        # fixed k = 4

One round:

1. Sync the draft's context with the committed target text. Both sides are tracked as bytes:
   the target text T is the concatenation of the committed target tokens' bytes (the target's
   BOS left out; chat-template tokens stay as their text), and the draft context is
   draft-BOS + a tokenization of T whose byte offsets are known. The last `lookbehind` draft
   tokens (and whatever text came since) are re-encoded with the draft tokenizer, so token
   boundaries stay right; the draft's KV cache keeps its longest prefix that still matches
   and only the changed tail is recomputed.
2. Draft k tokens greedily in the draft vocabulary (k chosen per round from the measured
   costs and acceptance, fixed, or stopped by the adaptive confidence threshold of the
   `model` drafter). A draft special token that the target does not know (SmolLM2's
   <|im_end|> for Gemma) ends the draft.
3. The draft text D (their bytes; an incomplete trailing UTF-8 character cut) is re-encoded in
   the target vocabulary across the boundary with the committed text: tail + D, where tail is
   the text of the last few committed target tokens, and the ids after those committed tokens
   are the proposal. When the committed tail does not re-tokenize to itself (the target's last
   token is a word prefix that would merge with D), the piece of D inside the straddling token
   is tokenized on its own and the rest is kept as tokenized in context.
4. The proposal is a point mass (q = None): verification accepts token x with probability
   p(x) and resamples from p without x, so the output distribution is the target's whatever
   the draft did - sampling stays exactly lossless, greedy stays exact.
5. After verification, the draft tokens and the proposed target tokens are aligned - banded DTW
   over normalised token strings (`align=dtw`, TokenTiming; band `window`, default 8) or the
   longest common diagonal (`align=lcd`, HF UAG) - and the accepted target prefix is mapped to
   the number of draft tokens it covers; the draft cache is rolled back to that point (never
   past what the bytes prove: a kept draft token must lie inside the accepted text). The
   alignment also labels draft tokens accepted / rejected for the adaptive threshold.

Chat-templated targets: the draft sees the target's own rendering (the template's markers as
text), because the drafter only has the target's ids - the conversation is not recoverable as
messages - and because the draft's job is to predict this exact text; a draft with its own chat
template would be conditioned on a different string than the one the target continues.

Draft precision, `precision=fp32|fp16w|bf16` (default: the target's; a draft that is the target
or a `NAME-lN` truncation of it shares the target's weights): the draft is loaded on its own in
that precision (models/precision.py). It changes which tokens are proposed, never what is
accepted - verification is the target's alone. The draft/target cost ratio per token bounds the
speedup on a CPU; which mode is cheapest per token depends on the machine (docs/precision.md).

Parameters: `num_tokens` (alias `k`: draft tokens per round, default 4 fixed / 12 dynamic /
at most 8 auto), `mode` (auto, the default when no k is given: each round the k that
maximises measured tokens per second, none at all when the acceptance cannot pay for the
draft model - drafters/autolength.py; fixed, the default when k is given; dynamic),
`threshold` (dynamic start, 0.4), `align` (dtw | lcd), `window` (alias `band`, the DTW band,
8), `lookbehind` (draft tokens re-encoded each round, 8), `text`, `precision`.

Same vocabulary (draft and target tokenizers equal): the text round trip is skipped - the
draft reads the target ids and proposes its own ids, as `model` does (`text=true` forces the
text path, for tests).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..align import dtw_path, kept_by_path, lcd_path, norm_piece, token_bytes
from ..draft import DecodeContext, Draft, DraftEnv, Round, as_round
from ..errors import VeridraftError
from ..spec import Param
from .autolength import AutoLength
from .model import (
    common_prefix,
    net_of,
    resolve_draft_in,
    roc_threshold,
    vocab_of,
)
from .params import as_bool, as_choice, as_float, as_int

ALIGNS = ("dtw", "lcd")
MODES = ("fixed", "dynamic", "auto")
_MAX_HISTORY = 8192
_TAIL_TARGET_TOKENS = 4  # committed target tokens re-encoded with the draft text
_STEADY_FEED = 24  # a draft forward reading more new tokens than this is a catch-up


def _complete_end(b: bytes | bytearray, start: int = 0) -> int:
    """Length of the longest prefix of b that does not end inside a UTF-8 character."""
    n = len(b)
    i = n - 1
    back = 0
    while i >= start and back < 4 and (b[i] & 0xC0) == 0x80:
        i -= 1
        back += 1
    if i < start:
        return n if back == 0 else start
    lead = b[i]
    if lead < 0x80:
        return n
    need = (
        2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
    )
    return n if back + 1 >= need else i


def _is_cont(b: bytes | bytearray, i: int) -> bool:
    return i < len(b) and (b[i] & 0xC0) == 0x80


class UniversalDrafter:
    """Draft with a model of any tokenizer; propose its text re-encoded in the target's."""

    name = "universal"
    takes_arg = True
    usage = (
        "universal:DRAFT (a catalog name, an HF folder or GGUF path), e.g. "
        "universal:smollm2-135m or universal:smollm2-135m:align=lcd,k=6"
    )
    description = "a draft model with any tokenizer, its text re-encoded in the target's"
    params = {
        "num_tokens": Param(int, None, "draft tokens per round (by mode: 4, 12 or 8)"),
        "mode": Param(str, None, "draft length: fixed, dynamic or auto (the measured best)", MODES),
        "threshold": Param(float, 0.4, "dynamic mode: stop below this draft confidence"),
        "align": Param(str, "dtw", "how draft and target tokens are aligned", ALIGNS),
        "window": Param(int, 8, "alignment band"),
        "lookbehind": Param(int, 8, "target tokens re-read to align the draft"),
        "text": Param(bool, False, "re-encode through text even with the same vocabulary"),
        "precision": Param(str, None, "the draft's precision mode (default: the target's)"),
    }
    aliases = {
        "k": "num_tokens",
        "band": "window",
        "num_assistant_tokens": "num_tokens",
        "assistant_confidence_threshold": "threshold",
    }

    def __init__(
        self,
        draft_net: nn.Module,
        draft_tokenizer,
        target_tokenizer,
        *,
        num_tokens: int | None = None,
        mode: str | None = None,
        threshold: float = 0.4,
        align: str = "dtw",
        window: int = 8,
        lookbehind: int = 8,
        text: bool = False,
        label: str = "universal",
    ) -> None:
        m = "universal"
        if draft_tokenizer is None or target_tokenizer is None:
            raise VeridraftError("universal: both the draft and the target need a tokenizer")
        self.net = draft_net
        self.dtok, self.ttok = draft_tokenizer, target_tokenizer
        if mode is None:  # no length asked for: the measured best (cost-aware length)
            mode = "fixed" if num_tokens is not None else "auto"
        self.mode = as_choice(m, "mode", mode, MODES)
        if num_tokens is None:
            num_tokens = {"fixed": 4, "dynamic": 12, "auto": 8}[self.mode]
        self.num_tokens = as_int(m, "num_tokens", num_tokens, lo=1)
        self.auto = AutoLength(self.num_tokens) if self.mode == "auto" else None
        self._proposed = 0
        self.threshold = as_float(m, "threshold", threshold, lo=0.0, hi=1.0)
        self.align = as_choice(m, "align", align, ALIGNS)
        self.window = as_int(m, "window", window, lo=0)
        self.lookbehind = as_int(m, "lookbehind", lookbehind, lo=1)
        force_text = as_bool(m, "text", text)
        self.name = label
        a, b = vocab_of(draft_tokenizer), vocab_of(target_tokenizer)
        self.identity = not force_text and (
            draft_tokenizer is target_tokenizer or (a is not None and a == b)
        )
        self.tb_d = token_bytes(draft_tokenizer)
        self.tb_t = token_bytes(target_tokenizer)
        self.d_prefix = list(draft_tokenizer.encode("", add_special_tokens=True))
        t_special = {self.tb_t[i] for i in self.tb_t.special}
        # a draft special token whose text is not a special token of the target ends a draft
        d_special = self.tb_d.special | set(getattr(draft_tokenizer, "eos_ids", ()) or ())
        self._d_stop = {i for i in d_special if self.tb_d[i] not in t_special}
        self._hist_p: list[float] = []
        self._hist_m: list[int] = []
        self.cache = None
        self.prof = {
            "rounds": 0,
            "draft_forward_s": 0.0,
            "catch_up_s": 0.0,  # forwards reading much new text (the prompt, text after idling)
            "draft_tokens": 0,
            "fed_tokens": 0,
            "reencode_s": 0.0,
            "align_s": 0.0,
            "align_calls": 0,
            "align_short": 0,  # rounds where the alignment kept fewer draft tokens than the bytes
        }
        self._reset()

    @classmethod
    def from_spec(
        cls, model, arg: str | None, params: dict, env: DraftEnv | None = None
    ) -> UniversalDrafter:
        env = env or DraftEnv()
        params = dict(params)
        precision = params.pop("precision", None)
        draft, label = resolve_draft_in("universal", arg, model, precision, env)
        ttok = getattr(model, "tokenizer", None)
        dtok = getattr(draft, "tokenizer", None)
        if ttok is None or dtok is None:
            raise VeridraftError(
                f"universal: {'the target' if ttok is None else repr(label)} has no tokenizer; "
                "universal drafting needs both tokenizers (load models with veridraft.load)"
            )
        return cls(net_of(draft), dtok, ttok, label=f"universal:{label}", **params)

    def __repr__(self) -> str:
        return (
            f"UniversalDrafter({self.name!r}, align={self.align!r}, mode={self.mode!r}, "
            f"num_tokens={self.num_tokens}, identity={self.identity})"
        )

    # -- state -------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._T = bytearray()  # committed target text (bytes)
        self._t_n = 0  # target ids consumed into _T
        self._t_ends: list[int] = []  # byte end of each consumed target id (index - _t0)
        self._t0 = 0  # index of the first target id that is text (after the target BOS)
        self._d_ids: list[int] = []  # draft context ids (prefix + text tokens)
        self._d_ends: list[int] = []  # byte end in _T of each text token (index - len(prefix))
        self._cached: list[int] = []  # ids whose keys/values are in the draft cache
        self._round = None  # what update() needs about the last proposal

    def _alloc(self, need: int) -> None:
        if self.cache is None or self.cache.max_len < need:
            self.cache = self.net.new_cache(need)
        self.cache.truncate(0)
        self._cached = []

    def _consume_target(self, ids: list[int]) -> None:
        """Append the bytes of target ids not yet consumed to _T."""
        tb = self.tb_t
        T, ends = self._T, self._t_ends
        for i in ids[self._t_n :]:
            T += tb[i]
            ends.append(len(T))
        self._t_n = len(ids)

    # -- protocol ----------------------------------------------------------------------------

    def prefill(self, ctx: DecodeContext) -> None:
        self._reset()
        ids = ctx.ids
        bos = getattr(self.ttok, "bos_id", None)
        if self.identity:
            need = len(ids) + max(ctx.max_new_tokens, 1) + self.num_tokens + 8
            self._alloc(need)
            self._d_ids = list(ids)
        else:
            self._t0 = 1 if ids and bos is not None and ids[0] == bos else 0
            self._t_n = self._t0
            self._consume_target(ids)
            e = _complete_end(self._T)
            text = bytes(self._T[:e]).decode("utf-8", errors="replace")
            body = self.dtok.encode(text, add_special_tokens=False)
            self._d_ids = self.d_prefix + body
            self._d_ends = self.tb_d.ends(body)
            need = len(self._d_ids) + 4 * max(ctx.max_new_tokens, 1) + 2 * self.num_tokens + 16
            self._alloc(need)
        # the draft reads the prompt in its first round, not here: a cost-aware draft that
        # never drafts never pays for it

    def _forward(self, feed: list[int], logits: bool = True) -> torch.Tensor | None:
        if self.cache.length + len(feed) > self.cache.max_len:  # grow: refeed everything
            old = self._cached
            self.cache = self.net.new_cache(2 * (len(old) + len(feed)) + 64)
            self._cached = []
            feed = old + feed
        t = time.perf_counter()
        out = self.net(torch.tensor(feed, dtype=torch.long), self.cache, num_logits=1)
        dt = time.perf_counter() - t
        self.prof["draft_forward_s"] += dt
        self.prof["fed_tokens"] += len(feed)
        if len(feed) > _STEADY_FEED:
            self.prof["catch_up_s"] += dt
        self._cached.extend(feed)
        return out[-1] if logits else None

    def _sync(self, ctx: DecodeContext) -> bool:
        """Bring _d_ids up to the committed text; False when the text ends inside a character
        (nothing sensible to draft from: the round proposes nothing)."""
        if self.identity:
            self._d_ids = list(ctx.ids)
            return True
        self._consume_target(ctx.ids)
        T = self._T
        e = _complete_end(T)
        p0 = len(self.d_prefix)
        s = max(p0, len(self._d_ids) - self.lookbehind)
        while s > p0 and _is_cont(T, self._d_ends[s - 1 - p0]):
            s -= 1
        c = self._d_ends[s - 1 - p0] if s > p0 else 0
        if c > e:  # should not happen (draft tokens only cover committed text)
            s, c = p0, 0
        body = self.dtok.encode(bytes(T[c:e]).decode("utf-8", errors="replace"), False)
        del self._d_ids[s:], self._d_ends[s - p0 :]
        self._d_ids.extend(body)
        self._d_ends.extend(self.tb_d.ends(body, c))
        return e == len(T)

    @torch.inference_mode()
    def propose(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        if self.cache is None:
            self.prefill(ctx)
        self._round = None
        self.prof["rounds"] += 1
        k = min(self.num_tokens, max_tokens)
        if self.auto is not None:
            k = self.auto.choose(k)
        t0 = time.perf_counter()
        n0, c0 = self.prof["draft_tokens"], self.prof["catch_up_s"]
        draft = self._draft(ctx, k, max_tokens) if k > 0 else Draft(tokens=[])
        self._proposed = len(draft.tokens)
        if self.auto is not None:
            # the steady cost per draft token: catching up on long text is paid once, not per
            # round of drafting, so it does not count against the next round's k
            spent = time.perf_counter() - t0 - (self.prof["catch_up_s"] - c0)
            self.auto.drafted(self.prof["draft_tokens"] - n0, spent)
        return draft

    def _draft(self, ctx: DecodeContext, k: int, max_tokens: int) -> Draft:
        t0 = time.perf_counter()
        ok = self._sync(ctx)
        self.prof["reencode_s"] += time.perf_counter() - t0
        if not ok or not self._d_ids:
            return Draft(tokens=[])
        d_ids = self._d_ids
        n = common_prefix(self._cached, d_ids, min(len(self._cached), len(d_ids) - 1))
        self.cache.truncate(n)
        del self._cached[n:]
        feed = d_ids[n:]
        dynamic = self.mode == "dynamic"
        xs: list[int] = []
        conf: list[float] = []
        for _ in range(k):
            logits = self._forward(feed)
            x = int(logits.argmax())
            if not self.identity and (x in self._d_stop or not self.tb_d[x]):
                break
            c = float(torch.softmax(logits, -1)[x]) if dynamic else 1.0
            xs.append(x)
            conf.append(c)
            if dynamic and c < self.threshold:
                break
            feed = [x]
        self.prof["draft_tokens"] += len(xs)
        if not xs:
            return Draft(tokens=[])
        if self.identity:
            self._round = (len(d_ids), xs, conf, None, None, None)
            return Draft(tokens=xs)
        t1 = time.perf_counter()
        props, x_ends, p_ends, exact = self._to_target(ctx, xs, max_tokens)
        self.prof["reencode_s"] += time.perf_counter() - t1
        self._round = (len(d_ids), xs, conf, props, x_ends, p_ends if exact else None)
        return Draft(tokens=props)

    def _to_target(self, ctx, xs: list[int], limit: int):
        """Draft tokens -> (target proposal ids, draft byte ends, proposal byte ends, exact)."""
        D = self.tb_d.of(xs)
        x_ends = self.tb_d.ends(xs)
        D = D[: _complete_end(D)]
        if not D:
            return [], x_ends, [], False
        ids = ctx.ids
        T = self._T
        ends = self._t_ends  # ends[i - t0] = end of ids[i]
        n_text = len(ids) - self._t0
        r = min(_TAIL_TARGET_TOKENS, n_text)
        while r > 0 and _is_cont(T, ends[n_text - r - 1] if n_text - r - 1 >= 0 else 0):
            r -= 1  # the tail must start on a character
        start = ends[n_text - r - 1] if n_text - r - 1 >= 0 else 0
        tail_ids = ids[len(ids) - r :] if r else []
        tail = bytes(T[start:]).decode("utf-8", errors="replace")
        dtext = D.decode("utf-8")
        enc = self.ttok.backend.encode(tail + dtext, add_special_tokens=False)
        got = enc.ids
        if got[:r] == tail_ids:
            props = got[r:]
        else:
            L = len(tail)
            offs = enc.offsets
            s = 0
            while s < len(got) and offs[s][0] < L:
                s += 1
            props = got[s:]
            if s > 0 and offs[s - 1][1] > L:  # a token straddles the boundary
                head = dtext[: offs[s - 1][1] - L]
                props = self.ttok.encode(head, add_special_tokens=False) + props
        p_ends = self.tb_t.ends(props)
        exact = bool(p_ends) and p_ends[-1] == len(D)
        if not exact:
            props = self.ttok.encode(dtext, add_special_tokens=False)
            p_ends = self.tb_t.ends(props)
            exact = bool(p_ends) and p_ends[-1] == len(D)
        props = props[:limit]
        return props, x_ends, p_ends[: len(props)], exact

    def update(self, rnd: Round | int, next_token: int | None = None) -> None:
        r = as_round(rnd, next_token)
        n_accepted = r.n_accepted
        if self.auto is not None:
            self.auto.verified(self._proposed, n_accepted, r.verify_s)
        self._proposed = 0
        rnd = self._round
        self._round = None
        if rnd is None:
            return
        ctx_len, xs, conf, props, x_ends, p_ends = rnd
        if self.identity:
            keep = n_accepted
            matched = n_accepted
        else:
            acc_bytes = p_ends[n_accepted - 1] if (p_ends and n_accepted) else 0
            by_bytes = 0
            if p_ends is not None:
                while by_bytes < len(xs) and x_ends[by_bytes] <= acc_bytes:
                    by_bytes += 1
            if n_accepted == len(props) and p_ends is not None:
                matched = by_bytes
            else:
                t = time.perf_counter()
                a = [norm_piece(self.tb_d[x]) for x in xs]
                b = [norm_piece(self.tb_t[p]) for p in props]
                if self.align == "dtw":
                    path = dtw_path(a, b, self.window)
                else:
                    path = lcd_path(a, b)
                matched = kept_by_path(path, len(xs), n_accepted) if b else 0
                self.prof["align_s"] += time.perf_counter() - t
                self.prof["align_calls"] += 1
                if matched < by_bytes:
                    self.prof["align_short"] += 1
            keep = min(matched, by_bytes)
        # the draft context: what it was + the kept draft tokens
        del self._d_ids[ctx_len:]
        self._d_ids.extend(xs[:keep])
        if not self.identity:
            p0 = len(self.d_prefix)
            base = self._d_ends[ctx_len - 1 - p0] if ctx_len > p0 else 0
            del self._d_ends[ctx_len - p0 :]
            self._d_ends.extend(base + e for e in x_ends[:keep])
        n = min(len(self._cached), len(self._d_ids))
        self.cache.truncate(n)
        del self._cached[n:]
        if self.mode == "dynamic":
            marks = [1] * min(matched, len(conf)) + ([0] if matched < len(conf) else [])
            self._hist_p.extend(conf[: len(marks)])
            self._hist_m.extend(marks)
            if len(self._hist_p) > _MAX_HISTORY:
                del self._hist_p[:-_MAX_HISTORY], self._hist_m[:-_MAX_HISTORY]
            if len(self._hist_p) > 5:
                t = roc_threshold(self._hist_p, self._hist_m)
                if t is not None:
                    self.threshold = t
