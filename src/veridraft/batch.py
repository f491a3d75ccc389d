"""Continuous batching: several sequences decoded together, each answer bitwise its answer alone.

A step runs one target forward over the rows of every running sequence (its last id and its
draft, a chain or a token tree): each sequence keeps its own KV cache, drafter, draft length and
acceptance (ragged rounds), and sequences join and leave between steps. A newcomer's prompt is
prefilled a chunk per step, so the running ones keep their inter-token latency.

Why the rows of other sequences cannot change a row: in the row-invariant modes (bf16, q4,
q4a8) every matmul gives row i the same bits whatever the other rows are (models/precision.py,
models/q4.py), and the decode attention kernel reduces a row over the sequence of keys it reads,
in blocks at fixed offsets of that sequence (models/attnkernel.cpp). So the caches of all
sequences live in one slab (`Slab`): sequence s owns positions [off_s, off_s + n_s), a step
writes its new rows to a scratch area at the slab's end, and each row reads its own sequence's
cached positions and then, as explicit positions, its own sequence's new rows up to itself (a
tree node: its ancestors), which is the key sequence a one-sequence forward reads. The scratch
rows are then copied to their sequences, and each sequence's round ends as `decode`'s does.

fp32 and fp16w are not row-invariant in that sense (MKL's float32 matmul moves rows by ~1e-6
with the batch), so there a step runs one forward per sequence, interleaved: continuous
batching's scheduling without the shared forward.

A prompt runs through the target alone, a chunk per step (into a private cache that is then
copied into the slab), in chunks that fill the cache exactly as a solo prefill does
(`prefill_chunk_for`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .cache import KVCache
from .decode import PREFILL_CHUNK, Seq, commit, finish, prompt_bounds, propose, start_seq
from .draft import Drafter
from .errors import VeridraftError
from .models.attention import KERNEL, Span, Step, first_key
from .sampling import SamplingParams
from .stats import Stats
from .verify import STRICT, Rule

# modes whose matmuls are row-invariant: the rows of several sequences share one forward
ROW_INVARIANT = ("bf16", "q4", "q4a8")
# rows of one batched forward (the scratch area of the slab): 8 sequences with 16-token drafts
# fit; more sequences get shorter drafts. Every kernel of the step is row-invariant at any row
# count, so this bounds memory, not exactness
MAX_ROWS = 256
# a newcomer's prompt positions per step in the row-invariant modes: a multiple of the prefill
# attention tile (models/attention.py PREFILL_TILE), so its chunks fill the cache as a solo
# prefill's do; fp32 / fp16w keep decode's own chunks
BATCH_PREFILL_CHUNK = 512
# where every prompt row is a per-row computation (the q4 kernels, prompt attention through the
# decode kernel) any chunking fills the cache alike: small chunks keep the others' latency
ROW_PREFILL_CHUNK = 64


def prefill_chunk_for(net, batched: bool) -> int:
    """The newcomer's prompt positions per step that fill its cache bitwise as a solo prefill."""
    from .models import attnkernel

    if not batched:
        return PREFILL_CHUNK  # decode's own chunks: fp32 / fp16w rows depend on the forward
    per_row = getattr(net, "precision", "") in ("q4", "q4a8") and attnkernel.for_prompts(
        net.cache_dtype
    )
    return ROW_PREFILL_CHUNK if per_row else BATCH_PREFILL_CHUNK


def row_invariant(net) -> bool:
    """Whether `net` can run several sequences' rows in one forward, each bitwise alone."""
    from .models import attnkernel

    return (
        getattr(net, "precision", "fp32") in ROW_INVARIANT
        and bool(getattr(net, "rowwise_attention", False))
        and net.config.head_dim <= 256
        and attnkernel.load() is not None
    )


@dataclass
class Request:
    """One generation to batch: decode's arguments for one sequence."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator = field(default_factory=torch.Generator)
    drafter: Drafter | None = None
    max_draft: int = 16
    # False: this request drafts max_draft tokens whatever the load (a sampled request with a
    # drafter: its seed reproduces only with the draft lengths it had alone)
    adaptive: bool = True
    rule: Rule | None = None
    eos_ids: frozenset[int] = frozenset()
    should_stop: Callable[[list[int]], int | None] | None = None
    on_tokens: Callable[[list[int]], None] | None = None
    tokenizer: object = None
    # the target's log-probabilities of every emitted token (Entry.logprobs), with this many
    # most likely alternatives each; None: not computed
    logprobs: int | None = None
    on_logprobs: Callable[[list], None] | None = None  # each emitted token's, before on_tokens


@dataclass
class Entry:
    """A request in the batcher: waiting, prefilling, running, then done (or cancelled)."""

    req: Request
    need: int  # cache positions it holds while admitted
    state: str = "waiting"
    off: int = -1  # its slab positions start here (row-invariant modes)
    cache: KVCache | None = None
    prompt_cache: KVCache | None = None  # the private cache a slab sequence prefills into
    bounds: list[int] = field(default_factory=list)
    done_to: int = 0  # prompt positions prefilled so far
    last: torch.Tensor | None = None
    seq: Seq | None = None
    stats: Stats | None = None
    result: tuple[list[int], Stats] | None = None
    error: Exception | None = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_admitted: float | None = None
    draft_lens: list[int] = field(default_factory=list)  # per step, the draft cap it was given
    # per emitted token (Request.logprobs): (id, log-probability, [(id, log-probability)] of
    # the most likely ids), from the very logits that chose it
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    round_logits: torch.Tensor | None = None  # this round's verification logits


class Region(KVCache):
    """One sequence's positions [off, off + n) of a slab, seen as its own KVCache (views): the
    decode loop's rollback (keep, truncate) and a drafter's checks work on it unchanged."""

    def __init__(self, slab: KVCache, off: int, n: int) -> None:
        self.k = [t[:, :, off : off + n] for t in slab.k]
        self.v = [t[:, :, off : off + n] for t in slab.v]
        self.max_len, self.length, self.low_water, self.off = n, 0, n, off


def new_slab(net, positions: int) -> KVCache:
    """A KVCache of `positions` whose layers are slices of one tensor: a step's scratch rows
    reach every layer of their sequences in one copy."""
    c = net.config
    shape = (c.n_layers, c.n_kv_heads, positions, c.head_dim)
    slab = KVCache.__new__(KVCache)
    # uninitialised: a row reads only positions its own sequence wrote (its prompt, its
    # committed rows, this step's scratch rows), and untouched pages cost no memory, so a
    # budget of several full contexts holds only what the admitted sequences use
    slab.all_k = torch.empty(shape, dtype=net.cache_dtype)
    slab.all_v = torch.empty(shape, dtype=net.cache_dtype)
    slab.k = [slab.all_k[i : i + 1] for i in range(c.n_layers)]
    slab.v = [slab.all_v[i : i + 1] for i in range(c.n_layers)]
    slab.max_len, slab.length, slab.low_water = positions, 0, positions
    return slab


class Allocator:
    """First-fit ranges of cache positions; freed ranges merge with their neighbours."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.free: list[tuple[int, int]] = [(0, capacity)]  # (start, length), by start

    @property
    def used(self) -> int:
        return self.capacity - sum(n for _, n in self.free)

    def alloc(self, n: int) -> int | None:
        for i, (a, m) in enumerate(self.free):
            if m >= n:
                self.free[i : i + 1] = [(a + n, m - n)] if m > n else []
                return a
        return None

    def release(self, a: int, n: int) -> None:
        self.free.append((a, n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, m in self.free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + m)
            else:
                merged.append((s, m))
        self.free = merged


class MeasuredCost:
    """The cost of a round of this batch as measured by its own steps (the forward, and every
    row's verification and commit; drafting is priced apart), for a machine without a cost
    profile: the median ms of the recent rounds of each width, joined by straight lines. A
    straight line through all of them would not do: a CPU forward costs about the same up to
    some 4-8 rows and then grows steeply, and a line averages the two regimes, pricing wide
    steps too low exactly where drafts stop paying. Beyond the widest measured width a row costs
    its share of that width's forward (never less per row than measured). Ready once it has seen
    enough steps of at least two widths (ragged drafts and changing loads provide them)."""

    def __init__(self, keep: int = 256, min_samples: int = 16) -> None:
        self.samples: list[tuple[int, float]] = []
        self.keep, self.min_samples = keep, min_samples
        self.fit: list[tuple[int, float]] | None = None  # (width, ms), widths ascending

    def observe(self, rows: int, ms: float) -> None:
        self.samples.append((rows, ms))
        del self.samples[: -self.keep]
        widths = sorted({t for t, _ in self.samples})
        if len(self.samples) < self.min_samples or len(widths) < 2:
            return
        points, floor = [], 0.0
        for w in widths:
            floor = max(floor, statistics.median(m for t, m in self.samples if t == w))
            points.append((w, floor))  # more rows never cost less: noise is smoothed upwards
        self.fit = points

    def forward(self, t: float, context: int | None = None, tree: bool = False) -> float:
        pts = self.fit
        if t <= pts[0][0]:
            return pts[0][1]
        for (w0, m0), (w1, m1) in zip(pts, pts[1:]):
            if t <= w1:
                return m0 + (m1 - m0) * (t - w0) / (w1 - w0)
        w, m = pts[-1]
        return m * t / w

    def draft_cost(self, key, context: int | None = None) -> float | None:
        return None  # measured per sequence (DraftPlanner)


@dataclass
class Solo:
    """A sequence's drafting rounds alone, as the planner counts them."""

    seen: int = 0  # drafting rounds run alone
    rounds: int = 0  # of those, counted (the first SOLO_SKIP are not)
    ms: float = 0.0  # their forwards, verification and drafting
    tokens: int = 0  # ids they emitted
    off: bool = False  # drafting switched off for good


class DraftPlanner:
    """Draft tokens per sequence for this step: the caps that maximise the batch's expected
    tokens per second, where a draft token is one more row of a forward that every running
    sequence waits for. Candidates: k = 0 for all (so speculation never makes a step slower by
    the cost model's account), one k for all, and rows handed out one at a time to the sequence
    whose next draft token pays most (by its own acceptance rate); as the batch grows the caps
    fall to 0 by themselves. A sequence running alone keeps its own cap, as decode() would.

    cost: a costmodel.CostModel (forward(T) ms and draft_cost per drafter, from `veridraft
    profile`); None: the batch's own measured forwards (MeasuredCost), and until those suffice
    each request's own max_draft. A drafter's step cost without a profile entry is the
    measured draft time per drafted token of its kind, pooled over the running and the past
    sequences that used it (a newcomer's first drafts are not priced as free).

    A lone sequence is judged by its own rounds instead of the acceptance model (which prices a
    token tree's drafts by their acceptance per node, far below what a tree gains per round):
    once `SOLO_ROUNDS` of its drafting rounds have run alone (its first not counted: a draft
    model's pass over the prompt), it stops drafting if those rounds gave fewer tokens per
    second, drafting included, than one-token steps would, less `SOLO_MARGIN` (the batch's own
    recent one-token steps where it has run three, else the cost model's forward(1)); its
    Stats note says so with both rates."""

    SOLO_ROUNDS = 8
    SOLO_SKIP = 1
    SOLO_MARGIN = 0.05

    def __init__(self, cost=None, prior_alpha: float = 0.5) -> None:
        self.cost, self.prior = cost, prior_alpha
        self.measured = MeasuredCost()
        # seconds and drafted tokens per drafter name, of sequences that have left: a new
        # request's drafter is priced by its kind's past before it has drafted itself
        self.history: dict[str, list[float]] = {}
        # per sequence that has drafted alone (by id, until it retires), and the lone drafting
        # round in flight: (its sequence, ids emitted and draft seconds before it)
        self.solo: dict[int, Solo] = {}
        self._pending: tuple[Seq, int, float] | None = None

    def retire(self, s: Seq) -> None:
        """Keep what a leaving sequence's drafter cost."""
        self.solo.pop(id(s), None)
        if s.drafter is not None and s.stats.drafted:
            h = self.history.setdefault(s.stats.method, [0.0, 0])
            h[0] += s.stats.draft_s
            h[1] += s.stats.drafted

    def _draft_ms(self, seqs: list[Seq]) -> dict[str, float]:
        """ms per drafted token of each drafter kind: its running and past sequences pooled."""
        pool = {name: list(h) for name, h in self.history.items()}
        for s in seqs:
            if s.drafter is not None and s.stats.drafted:
                h = pool.setdefault(s.stats.method, [0.0, 0])
                h[0] += s.stats.draft_s
                h[1] += s.stats.drafted
        return {name: 1000 * t / n for name, (t, n) in pool.items()}

    def observe(self, rows: int, ms: float) -> None:
        self.measured.observe(rows, ms)
        p, self._pending = self._pending, None
        if p is None or rows < 2:  # not a lone round, or its drafter proposed nothing
            return
        s, n0, d0 = p
        rec = self.solo.setdefault(id(s), Solo())
        rec.seen += 1
        if rec.seen > self.SOLO_SKIP:
            rec.rounds += 1
            rec.ms += ms + 1000 * (s.stats.draft_s - d0)
            rec.tokens += len(s.new) - n0

    def _solo_loses(self, s: Seq, cost, context: int | None) -> bool:
        """Whether a lone sequence's measured drafting rounds lose to one-token steps (and it
        stops drafting: once switched off, it stays off)."""
        rec = self.solo.get(id(s))
        if rec is None:
            return False
        if rec.off:
            return True
        if rec.rounds < self.SOLO_ROUNDS or (cost is self.measured and self.measured.fit is None):
            return False
        # tokens/s of one-token steps: the batch's own recent ones where it has run some (on
        # this machine's load right now), else the cost model's
        ones = [ms for rows, ms in self.measured.samples[-64:] if rows == 1]
        step = statistics.median(ones) if len(ones) >= 3 else cost.forward(1, context)
        plain = 1000.0 / step
        drafting = 1000.0 * rec.tokens / rec.ms
        if drafting >= plain * (1 - self.SOLO_MARGIN):
            return False
        rec.off = True
        s.stats.notes.append(
            f"drafting switched off: {rec.rounds} rounds alone gave {drafting:.1f} tokens/s, "
            f"drafting included, against {plain:.1f} for one-token steps"
        )
        return True

    def alpha(self, s: Seq) -> float:
        # a Beta-like prior: a sequence that has drafted little keeps near the prior
        return (s.stats.accepted + 2 * self.prior) / (s.stats.drafted + 2)

    def caps(self, seqs: list[Seq], adaptive: list[bool], context: int | None = None) -> list[int]:
        self._pending = None  # a round that ran no forward left nothing to count
        fixed = [s.max_draft if s.drafter is not None else 0 for s in seqs]
        cost = self.cost if self.cost is not None else self.measured
        # a lone sequence waits for no one: it drafts as decode() would alone, until its own
        # rounds show drafting losing (the measured fit, noisy on a busy machine, must not
        # switch off the drafting a request asked for before it has a fit at all)
        if len(seqs) == 1 and fixed[0] and adaptive[0]:
            if self._solo_loses(seqs[0], cost, context):
                return [0]
            self._pending = (seqs[0], len(seqs[0].new), seqs[0].stats.draft_s)
            return fixed
        if len(seqs) <= 1 or (cost is self.measured and self.measured.fit is None):
            return fixed
        free = [i for i, s in enumerate(seqs) if s.drafter is not None and adaptive[i]]
        if not free:
            return fixed
        alphas = [self.alpha(s) for s in seqs]
        base = cost.forward(1, context)
        step_ms = []  # per sequence, ms per drafted token
        pooled = self._draft_ms(seqs)
        for s in seqs:
            key = getattr(s.drafter, "cost_key", None) if s.drafter is not None else None
            step = cost.draft_cost(key) if key else None
            if step is not None:
                step_ms.append(step * base)
            else:
                step_ms.append(pooled.get(s.stats.method, 0.0))

        def rate(caps: list[int]) -> float:
            rows = sum(1 + k for k in caps)
            tokens = sum(sum(alphas[i] ** j for j in range(k + 1)) for i, k in enumerate(caps))
            ms = cost.forward(rows, context) + sum(step_ms[i] * k for i, k in enumerate(caps))
            return tokens / ms

        best = [0 if i in free else k for i, k in enumerate(fixed)]
        best_rate = rate(best)
        top = max(fixed[i] for i in free)
        for k in range(1, top + 1):  # one draft length for all
            cand = [min(k, fixed[i]) if i in free else fixed[i] for i in range(len(seqs))]
            if sum(1 + c for c in cand) > MAX_ROWS:
                break
            r = rate(cand)
            if r > best_rate:
                best, best_rate = cand, r
        # then rows where they pay most: from no drafts, one more token at a time to the
        # sequence whose next token adds most to the batch's rate (a sequence that accepts
        # much gets long drafts, one that accepts little none), while the rate grows
        cand = [0 if i in free else k for i, k in enumerate(fixed)]
        rows = sum(1 + c for c in cand)
        tokens = sum(sum(alphas[i] ** j for j in range(k + 1)) for i, k in enumerate(cand))
        drafting = sum(step_ms[i] * k for i, k in enumerate(cand))
        r = tokens / (cost.forward(rows, context) + drafting)
        while rows < MAX_ROWS:
            wider = cost.forward(rows + 1, context)
            nxt = None
            for i in free:
                if cand[i] < fixed[i]:
                    ri = (tokens + alphas[i] ** (cand[i] + 1)) / (wider + drafting + step_ms[i])
                    if nxt is None or ri > nxt[1]:
                        nxt = (i, ri)
            if nxt is None or nxt[1] <= r:
                break
            i, r = nxt
            tokens += alphas[i] ** (cand[i] + 1)
            drafting += step_ms[i]
            cand[i] += 1
            rows += 1
        return cand if r > best_rate else best


class Batcher:
    """The continuous-batching loop's state: `add` requests, call `step` until `idle`.

    kv_positions: the KV-cache budget in positions, shared by every admitted sequence (a
    sequence holds prompt + max_new_tokens + max_draft + 1); a request that can never fit is
    refused at `add`, one that does not fit now waits. max_num_seqs: sequences admitted at
    once. planner: the draft caps per step (DraftPlanner; None: each request's max_draft)."""

    def __init__(
        self,
        net,
        *,
        kv_positions: int = 32768,
        max_num_seqs: int = 8,
        planner: DraftPlanner | None = None,
        prefill_chunk: int | None = None,
        batched: bool | None = None,
    ) -> None:
        if max_num_seqs < 1:
            raise VeridraftError(f"max_num_seqs must be at least 1, got {max_num_seqs}")
        if kv_positions < 1:
            raise VeridraftError(
                f"the KV budget must be a positive number of positions, got {kv_positions}"
            )
        self.net = net
        self.batched = row_invariant(net) if batched is None else batched
        if self.batched and not row_invariant(net):
            raise VeridraftError(
                f"precision {getattr(net, 'precision', 'fp32')!r} is not row-invariant: "
                f"batched forwards need one of {', '.join(ROW_INVARIANT)}"
            )
        self.max_num_seqs = max_num_seqs
        self.planner = planner or DraftPlanner(None)
        if prefill_chunk is None:
            prefill_chunk = prefill_chunk_for(net, self.batched)
        self.prefill_chunk = prefill_chunk
        self.alloc = Allocator(kv_positions)
        self.slab = new_slab(net, kv_positions + MAX_ROWS) if self.batched else None
        self.waiting: list[Entry] = []
        self.active: list[Entry] = []  # prefilling or running, in admission order
        self.steps = 0
        # the loop's own seconds in prompt chunks and in decoding rounds: steps run one after
        # the other, so these add up to its busy time (a request's Stats cannot: its prefill
        # spans the other requests' rounds between its chunks)
        self.busy_s = {"prefill": 0.0, "decode": 0.0}

    # ---- requests in and out ----

    def add(self, req: Request) -> Entry:
        max_len = getattr(self.net.config, "max_position_embeddings", None)
        n = len(req.prompt_ids)
        if n < 1:
            raise VeridraftError("the prompt is empty")
        if max_len is not None and n + req.max_new_tokens > max_len:
            raise VeridraftError(
                f"prompt ({n} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the "
                f"model's context length ({max_len}); shorten the prompt or lower max_new_tokens"
            )
        for name in ("verify_capture", "prompt_capture"):
            if req.drafter is not None and getattr(req.drafter, name, None) is not None:
                raise VeridraftError(
                    f"drafter {req.drafter.name} reads the target's own activations, which a "
                    "batched forward does not capture; generate with it alone (generate_ids)"
                )
        need = n + req.max_new_tokens + req.max_draft + 1
        if need > self.alloc.capacity:
            raise VeridraftError(
                f"this request needs {need} KV-cache positions (prompt + max_tokens + draft) and "
                f"the budget holds {self.alloc.capacity}; lower max_tokens or raise the KV budget"
            )
        e = Entry(req=req, need=need)
        self.waiting.append(e)
        return e

    def cancel(self, e: Entry) -> None:
        """Drop a request now (between steps); its cache positions are freed."""
        if e in self.waiting:
            self.waiting.remove(e)
        elif e in self.active:
            self._release(e)
        e.state = "cancelled"

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    @property
    def running(self) -> list[Entry]:
        return [e for e in self.active if e.state == "running"]

    def usage(self) -> float:
        """The fraction of the KV budget held by admitted sequences."""
        return self.alloc.used / self.alloc.capacity

    def _release(self, e: Entry) -> None:
        if e.seq is not None:
            self.planner.retire(e.seq)
        self.active.remove(e)
        if e.off >= 0:
            self.alloc.release(e.off, e.need)
        e.cache = e.prompt_cache = e.last = None

    # ---- one step ----

    @torch.inference_mode()
    def step(self) -> list[Entry]:
        """Admit what fits, prefill one chunk of the oldest newcomer, run one round of every
        running sequence; return the entries that finished (done or failed) in this step."""
        self.steps += 1
        self._admit()
        ended: list[Entry] = []
        pre = next((e for e in self.active if e.state == "prefill"), None)
        if pre is not None:
            t0 = time.perf_counter()
            self._guard(pre, self._prefill_chunk, ended)
            self.busy_s["prefill"] += time.perf_counter() - t0
        running = self.running
        if running:
            t0 = time.perf_counter()
            try:
                self._round(running)
            except Exception as exc:  # the shared forward itself failed: every row with it
                for e in running:
                    if e.state == "running":
                        e.error, e.state = exc, "error"
            self.busy_s["decode"] += time.perf_counter() - t0
        for e in list(self.active):
            if e.state == "running" and e.seq.keep is not None:
                e.result = finish(e.seq)
                e.state = "done"
            if e.state in ("done", "error"):
                self._release(e)
                ended.append(e)
        return ended

    def _guard(self, e: Entry, fn, ended) -> None:
        try:
            fn(e)
        except Exception as exc:
            e.error, e.state = exc, "error"

    def _admit(self) -> None:
        while self.waiting and len(self.active) < self.max_num_seqs:
            e = self.waiting[0]
            off = self.alloc.alloc(e.need)
            if off is None:  # first come, first served: later ones wait behind it
                return
            self.waiting.pop(0)
            e.off, e.state, e.t_admitted = off, "prefill", time.perf_counter()
            n = len(e.req.prompt_ids)
            e.stats = Stats(prompt_tokens=n, method=getattr(e.req.drafter, "name", "ar"))
            rule = e.req.rule or STRICT
            e.stats.verify, e.stats.lossy = rule.name, bool(rule.lossy)
            if self.batched:
                e.cache = Region(self.slab, off, e.need)
                e.prompt_cache = self.net.new_cache(n)
            else:
                e.cache = e.prompt_cache = self.net.new_cache(e.need)
            e.bounds = prompt_bounds(n, self.prefill_chunk)[1:]
            self.active.append(e)

    def _prefill_chunk(self, e: Entry) -> None:
        b = e.bounds.pop(0)
        tokens = torch.tensor(e.req.prompt_ids[e.done_to : b], dtype=torch.long)
        e.last = self.net(tokens, e.prompt_cache, num_logits=1)[-1]
        e.done_to = b
        if e.bounds:
            return
        if self.batched:  # the prompt's rows into the sequence's slab positions
            n = e.done_to
            self.slab.all_k[:, :, e.off : e.off + n] = torch.cat(e.prompt_cache.k)[:, :, :n]
            self.slab.all_v[:, :, e.off : e.off + n] = torch.cat(e.prompt_cache.v)[:, :, :n]
            e.cache.length = n
            e.prompt_cache = None
        r = e.req
        on_tokens = r.on_tokens
        if r.logprobs is not None:

            def on_tokens(ids, e=e, user=r.on_tokens):
                lps = token_logprobs(e, ids)
                e.logprobs.extend(lps)
                if e.req.on_logprobs is not None:
                    e.req.on_logprobs(lps)
                if user is not None:
                    user(ids)

        e.seq = start_seq(
            self.net,
            r.prompt_ids,
            e.cache,
            e.last,
            e.stats,
            sampling=r.sampling,
            generator=r.generator,
            rule=r.rule or STRICT,
            max_new_tokens=r.max_new_tokens,
            max_draft=r.max_draft,
            drafter=r.drafter,
            eos_ids=r.eos_ids,
            should_stop=r.should_stop,
            on_tokens=on_tokens,
            t_start=e.t_admitted,
            tokenizer=r.tokenizer,
        )
        e.state = "running"

    def _round(self, running: list[Entry]) -> None:
        seqs = [e.seq for e in running]
        context = max(s.cache.length for s in seqs)
        caps = self.planner.caps(seqs, [e.req.adaptive for e in running], context)
        room = MAX_ROWS // len(seqs) - 1  # each sequence's share of the forward's rows
        caps = [min(k, room) for k in caps]
        # A request's own failure (its drafter, its callback: a client that left) ends that
        # request alone and never skips another's part of the round: a sequence whose rows ran
        # through the forward but were not committed would continue from a wrong cache.
        rows, proposed = [], []
        for e, k in zip(running, caps):
            e.draft_lens.append(k)
            row = _own(e, propose, e.seq, k)
            if row is not None:
                rows.append(row)
                proposed.append(e)
        running = proposed
        if not running:
            return
        n_rows = sum(tokens.shape[0] for tokens, _ in rows)
        # The planner prices a width by what a round of it costs besides drafting: the forward
        # and every row's verification and commit (the rows' share outside the forward is what
        # makes a draft that the forward alone would pay for a loss)
        t0 = time.perf_counter()
        if not self.batched:
            for e, (tokens, kw) in zip(running, rows):
                e.round_logits = self.net(tokens, e.seq.cache, **kw)
                _own(e, commit, e.seq, e.round_logits)
        else:
            logits = self._forward([e.seq for e in running], rows)
            at = 0
            for e, (tokens, _) in zip(running, rows):
                t = tokens.shape[0]
                e.round_logits = logits[at : at + t]
                _own(e, commit, e.seq, e.round_logits)
                at += t
        self.planner.observe(n_rows, 1000 * (time.perf_counter() - t0))

    # ---- the batched forward ----

    def _forward(self, seqs: list[Seq], rows: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
        """One forward over every sequence's rows; each sequence's cache advances by its rows
        as a forward of its own would advance it."""
        net, slab = self.net, self.slab
        scratch = self.alloc.capacity
        tokens = torch.cat([r[0] for r in rows])
        t_all = tokens.shape[0]
        if t_all > MAX_ROWS:
            raise VeridraftError(f"a batched step takes at most {MAX_ROWS} rows, got {t_all}")
        # per row: its position, its sequence's cached range and its own new rows (ext)
        pos, seq_of, news = [], [], []
        at = 0
        for j, (s, (tok, kw)) in enumerate(zip(seqs, rows)):
            t, cur = tok.shape[0], s.cache.length
            tree = kw.get("tree")
            if tree is None:
                depth, anc = list(range(t)), [list(range(i + 1)) for i in range(t)]
            else:
                depth, anc = tree.depth.tolist(), tree.rows
            for i in range(t):
                pos.append(cur + depth[i])
                seq_of.append(j)
                news.append([(at + r, cur + depth[r]) for r in anc[i]])
            at += t
        groups: dict[int | None, int] = {}
        lo_l, hi_l, ext_l = [], [], []
        for w in net.windows:
            if w in groups:
                continue
            groups[w] = len(lo_l)
            lo, hi, ext = [], [], []
            for r in range(t_all):
                s = seqs[seq_of[r]]
                off, cur = s.cache.off, s.cache.length
                first = first_key(pos[r], w)
                lo.append(off + min(first, cur)), hi.append(off + cur)
                ext.append([scratch + a for a, p in news[r] if p >= first])
            width = max(len(x) for x in ext)
            e = torch.full((1, t_all, width), -1, dtype=torch.long)
            for r, x in enumerate(ext):
                e[0, r, : len(x)] = torch.tensor(x, dtype=torch.long)
            lo_l.append(torch.tensor(lo, dtype=torch.long))
            hi_l.append(torch.tensor(hi, dtype=torch.long))
            ext_l.append(e)
        group_of = [groups[w] for w in net.windows]
        qpos = torch.tensor(pos, dtype=torch.long)
        rope = [net.rope.at(j, qpos) for j in range(len(net.rope.inv_freq))]
        x = net.embed(tokens)
        if net.fused is not None:
            cos = [c.reshape(t_all, -1).contiguous() for c, _ in rope]
            sin = [s.reshape(t_all, -1).contiguous() for _, s in rope]
            n_layers = len(net.layers)
            logits, *_ = net.fused.net.forward(
                x.contiguous(), slab.k, slab.v, scratch, cos, sin, lo_l, hi_l, ext_l,
                group_of, [True] * n_layers, t_all, False, [],
            )  # fmt: skip
            logits = net._softcap(logits)
        else:
            spans = [
                Span(0, None, None, w, kernel_keys=(lo_l[g], hi_l[g], ext_l[g]))
                for w, g in zip(net.windows, group_of)
            ]
            step = Step(slab, scratch, t_all, rope, spans, True, paths=[KERNEL] * len(spans))
            for layer in net.layers:
                x = layer(x, step, True, True)
            logits = net._softcap(net.output(net.norm(x))).float()
        # the scratch rows to their sequences: row r of sequence s at s's position cur + r
        dst = []
        for s, (tok, _) in zip(seqs, rows):
            a = s.cache.off + s.cache.length
            dst.append(torch.arange(a, a + tok.shape[0]))
            s.cache.note_write(s.cache.length)
            s.cache.advance(tok.shape[0])
        dst_t, src = torch.cat(dst), torch.arange(scratch, scratch + t_all)
        slab.all_k.index_copy_(2, dst_t, slab.all_k.index_select(2, src))
        slab.all_v.index_copy_(2, dst_t, slab.all_v.index_select(2, src))
        return logits


def _own(e: Entry, fn, *args):
    """fn(*args) for entry e; an exception ends e alone (returns None)."""
    try:
        return fn(*args)
    except Exception as exc:
        e.error, e.state = exc, "error"
        return None


def token_logprobs(e: Entry, ids: list[int]) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """The log-probabilities of `ids`, the first of the ids committed now: each from the logits
    row that chose it (the prompt's last row for the first token; in a round, the row of the
    accepted node's parent), so they are what plain decoding's rows give, bitwise."""
    if not ids:
        return []
    if e.seq is None:  # the first token, from the prompt's last logits
        rows = e.last[None]
    else:
        s = e.seq
        if s.draft.parents is None:
            idx = list(range(len(ids)))
        else:
            idx = ([0] + [1 + p for p in s.path])[: len(ids)]
        rows = e.round_logits[idx]
    lp = torch.log_softmax(rows.float(), -1)
    k = e.req.logprobs or 0
    out = []
    for i, t in enumerate(ids):
        top = []
        if k:
            v, j = lp[i].topk(k)
            top = list(zip(j.tolist(), v.tolist()))
        out.append((int(t), float(lp[i, t]), top))
    return out


def run_all(batcher: Batcher, entries: Sequence[Entry]) -> list[tuple[list[int], Stats]]:
    """Step until every entry has ended; their (new ids, stats) in order (a failed one
    raises its error)."""
    while any(e.state not in ("done", "error", "cancelled") for e in entries):
        batcher.step()
    out = []
    for e in entries:
        if e.error is not None:
            raise e.error
        out.append(e.result)
    return out
