"""`python -m veridraft.bench.eagle_head`: what a step of an EAGLE-3 head costs, before and
after the draft-time forward (HeadRunner), in one process. A round is `propose()` after a round
that accepted one token: the head runs the round's two new rows, then drafts (chain-3, and the
default tree). `before` is PlainDrafter (the head's layer run plainly from EagleHead's pieces,
as the drafter first did); `after` is the drafter; `weights=bf16` is its opt-in bfloat16
matmuls. All run interleaved (every one sees the same load) after warm-up, at 1 and 2 threads;
figures are medians over the rounds, divided by the round's head calls.

`--contexts 1024,4096,8192,16384 --window 512` instead times the drafter with full attention
against a sliding window (LongSpec's constant-size draft) at each context, interleaved, and
says how many cache rows each keeps.

The target is not loaded: the captured features and the token embeddings are random rows of
the target's width. A draft's cost does not depend on the numbers: a chain runs k - 1 head
steps and a tree k - 1 levels of `topk` rows whatever the head predicts.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from types import SimpleNamespace

import torch
from torch import Tensor

from ..draft import DecodeContext, Draft, Round
from ..drafters.eagle import EagleDrafter, Node, find_head, load_head
from ..models.base import Capture
from ..models.kernels import cpu_name
from ..sampling import SamplingParams

VARIANTS = {
    "chain-3": {"mode": "chain", "k": 3},
    "tree": {"mode": "tree"},  # the defaults: k=5, topk=3, 12 nodes
}


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [R, H, hd] over keys k, v [L, KV, hd] (repeated per query group) where mask [R, L]."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = torch.einsum("rhd,lhd->hrl", q, k) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("hrl,lhd->rhd", torch.softmax(s, -1), v)


class PlainDrafter(EagleDrafter):
    """The head run plainly from EagleHead's pieces, as the drafter first did: a cache
    [rows, kv_heads, hd] repeated per query group at every call, a draft round's keys
    concatenated onto it at every step, one call per level. The reference the runner must
    draft the same tokens as, and the `before` of the timing."""

    def prefill(self, ctx: DecodeContext) -> None:
        c = self.head.config
        super().prefill(ctx)
        self._k = torch.empty(ctx.cache.max_len + 1, c.num_key_value_heads, c.head_dim)
        self._v = torch.empty_like(self._k)

    def _catch_up(self, ids: list[int]) -> None:
        if not self._pending:
            return
        feats = torch.cat(self._pending)
        self._pending = []
        a, lo, n, head = self._start + self._len, self._len, feats.shape[0], self.head
        hidden = head.fc(feats.float())
        q, k, v = head.qkv(hidden, self._embed(ids[a + 1 : a + n + 1]), torch.arange(lo, lo + n))
        self._k[lo : lo + n], self._v[lo : lo + n] = k, v
        self._len += n
        mask = torch.ones(n, lo + n, dtype=torch.bool)
        mask[:, lo:] = torch.ones(n, n, dtype=torch.bool).tril()
        out = head.finish(hidden, attend(q, self._k[: lo + n], self._v[: lo + n], mask))
        self._h, self._logits = out[-1:], head.logits(out[-1:])

    def _rows(self, hidden: Tensor, tokens: list[int], depth: int, anc: list[list[int]]):
        """Drafted rows `depth` positions past the last real one: row r has input hidden[r] and
        tokens[r] and sees the real rows, the drafted rows anc[r] and itself."""
        head, lo, n = self.head, self._len, len(tokens)
        base = lo + len(self._dk)
        q, k, v = head.qkv(hidden, self._embed(tokens), torch.full((n,), lo + depth - 1))
        self._dk.extend(k.unbind(0))
        self._dv.extend(v.unbind(0))
        keys = torch.cat((self._k[:lo], torch.stack(self._dk)))
        vals = torch.cat((self._v[:lo], torch.stack(self._dv)))
        mask = torch.zeros(n, keys.shape[0], dtype=torch.bool)
        mask[:, :lo] = True
        for r in range(n):
            mask[r, [lo + a for a in anc[r]] + [base + r]] = True
        out = head.finish(hidden, attend(q, keys, vals, mask))
        return out, head.logits(out)

    def _chain(self, ctx: DecodeContext, k: int) -> Draft:
        self._dk, self._dv = [], []
        return super()._chain(ctx, k)

    def _chain_step(self, h: Tensor, tok: int, i: int) -> tuple[Tensor, Tensor]:
        out, lg = self._rows(h, [tok], i + 1, [list(range(i))])
        return out, lg[0]

    def _tree(self, ctx: DecodeContext, max_tokens: int) -> Draft:
        self._dk, self._dv = [], []
        nodes: list[Node] = []
        row: dict[int, int] = {}  # node -> its drafted row
        frontier = [(-1, self._h[0], self._logits[0], 0.0, [])]  # node, hidden, logits, logp, anc
        levels = min(self.k, max_tokens)
        for depth in range(1, levels + 1):
            children: list[int] = []
            for parent, _, logits, logp, _ in frontier:
                lp = torch.log_softmax(logits, -1)
                top = lp.topk(min(self.topk, lp.shape[0]))
                for v, i in zip(top.values.tolist(), top.indices.tolist()):
                    nodes.append(Node(int(self.ids[i]), parent, logp + v, depth))
                    children.append(len(nodes) - 1)
            if depth == levels:
                break
            best = sorted(children, key=lambda j: -nodes[j].logp)[: self.topk]
            hid = {f[0]: f[1] for f in frontier}
            ancs = {f[0]: f[4] for f in frontier}
            p = [nodes[j].parent for j in best]
            anc = [ancs[a] + ([row[a]] if a >= 0 else []) for a in p]
            first = len(self._dk)
            out, lg = self._rows(
                torch.stack([hid[a] for a in p]), [nodes[j].token for j in best], depth, anc
            )
            frontier = []
            for r, j in enumerate(best):
                row[j] = first + r
                frontier.append((j, out[r], lg[r], nodes[j].logp, anc[r]))
        return self._pick(nodes, ctx, max_tokens)


class FakeTarget:
    """What the drafter reads of a target: `embed` (random rows, one per token id mod 1024)."""

    def __init__(self, dim: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(1024, dim, generator=g) * 0.02

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens % self.table.shape[0]]


def _capture(layers: tuple[int, ...], rows: int, dim: int, g: torch.Generator) -> Capture:
    return Capture(
        hidden_layers=layers, hidden={i: torch.randn(rows, dim, generator=g) for i in layers}
    )


class FakeDecode:
    """One drafter decoding a fake sequence: `step()` is one round's propose() after an update
    with two new rows (one accepted token and the bonus token)."""

    def __init__(self, drafter, context: int, rounds: int, seed: int = 0) -> None:
        c = drafter.head.config
        self.drafter, self.dim, self.layers = drafter, c.target_hidden_size, c.capture_layers
        self.g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, c.vocab_size, (context,), generator=self.g).tolist()
        self.ctx = DecodeContext(
            ids=ids,
            prompt_len=context,
            target=FakeTarget(self.dim, seed),
            cache=SimpleNamespace(max_len=context + 2 * rounds + 64),
            sampling=SamplingParams(),
            generator=torch.Generator(),
            prompt_capture=_capture(self.layers, context - 1, self.dim, self.g),
        )
        drafter.prefill(self.ctx)
        t = time.perf_counter()
        drafter.propose(self.ctx, 16)  # the prompt's rows
        self.prompt_s = time.perf_counter() - t

    def step(self) -> float:
        ids = self.ctx.ids
        ids.extend(torch.randint(0, 1000, (2,), generator=self.g).tolist())
        cap = _capture(self.layers, 2, self.dim, self.g)
        self.drafter.update(Round(n_accepted=1, next_token=ids[-1], ids=ids, capture=cap, path=[0]))
        t = time.perf_counter()
        self.drafter.propose(self.ctx, 16)
        return time.perf_counter() - t


def measure(
    drafters: dict, context: int = 300, repeats: int = 40, warm: int = 3, runs: dict | None = None
) -> dict:
    """{name: median ms of a round's propose()} for drafters built on the same head, run
    interleaved (the order reverses every repeat). `runs` gets each drafter's FakeDecode."""
    runs = {} if runs is None else runs
    runs.update({k: FakeDecode(d, context, repeats + warm) for k, d in drafters.items()})
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    for r in range(repeats + warm):
        for k in names if r % 2 else names[::-1]:
            t = runs[k].step()
            if r >= warm:
                times[k].append(t * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m veridraft.bench.eagle_head", description=__doc__)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="catalog model with a head")
    ap.add_argument("--head", default=None, help="head folder or name (default: the newest)")
    ap.add_argument("--context", type=int, default=300, help="positions before the draft")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument(
        "--heads",
        default=None,
        help="comma-separated head folders or names: time the drafter on each of them "
        "(e.g. an EAGLE-3 head against gated or deeper ones), interleaved",
    )
    ap.add_argument(
        "--contexts",
        default=None,
        help="comma-separated contexts (e.g. 1024,4096,8192,16384): time full attention "
        "against --window at each, interleaved",
    )
    ap.add_argument("--window", type=int, default=512, help="the window of --contexts (512)")
    args = ap.parse_args(argv)
    from ..models.catalog import model_dir

    if args.heads:
        return compare_heads(model_dir(args.model), args)
    if args.contexts:
        return compare_windows(model_dir(args.model), args)

    folder = find_head(model_dir(args.model), args.head)
    if folder is None or not (folder / "config.json").is_file():
        raise SystemExit(f"no head for {args.model}; train one with `veridraft train head`")
    head = load_head(folder)
    if head.config.variant:  # PlainDrafter is EAGLE-3's one fc layer
        raise SystemExit(f"{folder.name} is a gated or deeper head; time it with --heads")
    print(f"head {folder.name} of {args.model}; {cpu_name()}, {os.cpu_count()} CPUs")
    print(f"context {args.context}, median of {args.repeats} interleaved rounds")
    print("ms per head call (a round's propose() / its head calls); before: PlainDrafter")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        drafters = {}
        for name, params in VARIANTS.items():
            drafters[name, "before"] = PlainDrafter(head, **params)
            drafters[name, "after"] = EagleDrafter(head, **params)
            drafters[name, "bf16"] = EagleDrafter(head, weights="bf16", **params)
        load = os.getloadavg()[0]
        ms = measure(drafters, args.context, args.repeats)
        print(f"threads {threads} (load average {load:.2f} before):")
        for name in VARIANTS:
            # head calls per round: the two real rows, then a chain's k - 1 steps or a
            # tree's k - 1 levels
            n = drafters[name, "after"].k
            a, b, c = (ms[name, w] / n for w in ("before", "after", "bf16"))
            print(
                f"  {name:<8} ({n} calls)  before {a:6.2f}  after {b:6.2f}  before/after "
                f"{a / b:4.2f}x  | weights=bf16 {c:6.2f}  before/bf16 {a / c:4.2f}x"
            )
    return 0


def compare_heads(base, args) -> int:
    """ms per head call of the drafter on several heads (chain and tree), interleaved."""
    heads = {}
    for spec in args.heads.split(","):
        folder = find_head(base, spec.strip())
        if folder is None or not (folder / "config.json").is_file():
            raise SystemExit(
                f"no head {spec!r} under {base}; train one with `veridraft train head`"
            )
        heads[folder.name] = load_head(folder)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; context {args.context}, median of "
          f"{args.repeats} interleaved rounds; ms per head call")  # fmt: skip
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        drafters = {
            (name, v): EagleDrafter(h, **params)
            for name, h in heads.items()
            for v, params in VARIANTS.items()
        }
        load = os.getloadavg()[0]
        ms = measure(drafters, args.context, args.repeats)
        print(f"threads {threads} (load average {load:.2f} before):")
        for name, h in heads.items():
            c = h.config
            cells = "  ".join(f"{v} {ms[name, v] / drafters[name, v].k:6.2f}" for v in VARIANTS)
            print(f"  {name:<28} fusion {c.fusion:<5} layers {c.num_layers}  {cells}")
    return 0


def compare_windows(base, args) -> int:
    """ms per head call with full attention and with a window at several contexts (chain of 3
    and the default tree, interleaved at each context), the cache rows each keeps, and the
    prompt's catch-up (one run each, so a rough figure)."""
    folder = find_head(base, args.head)
    if folder is None or not (folder / "config.json").is_file():
        raise SystemExit(f"no head under {base}; train one with `veridraft train head`")
    head = load_head(folder)
    w = args.window
    print(f"head {folder.name}; {cpu_name()}, {os.cpu_count()} CPUs; median of {args.repeats} "
          f"interleaved rounds; ms per head call; window={w} (sink 4) against full attention")  # fmt: skip
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for context in (int(c) for c in args.contexts.split(",")):
            drafters = {
                (v, a): EagleDrafter(head, window=win, **params)
                for v, params in VARIANTS.items()
                for a, win in (("full", "full"), ("window", w))
            }
            load = os.getloadavg()[0]
            runs: dict = {}
            ms = measure(drafters, context, args.repeats, runs=runs)
            for v in VARIANTS:
                n = drafters[v, "full"].k
                f, x = ms[v, "full"] / n, ms[v, "window"] / n
                rows = [drafters[v, a].runner.rows for a in ("full", "window")]
                prompt = [runs[v, a].prompt_s for a in ("full", "window")]
                print(
                    f"  threads {threads} context {context:>6} {v:<8} full {f:7.2f}  window "
                    f"{x:7.2f}  full/window {f / x:5.2f}x  | cache rows {rows[0]} / {rows[1]}  "
                    f"prompt catch-up {prompt[0]:6.1f} s / {prompt[1]:6.1f} s  (load {load:.2f})"
                )
            del drafters, runs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
