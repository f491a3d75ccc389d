"""`python -m veridraft.bench.attention`: the attention kernels at long contexts, interleaved in
one process: decode and verification rows (veridraft's kernel, models/attnkernel.cpp, vs torch's
grouped SDPA call per row, float32 and bfloat16 caches) and prompt attention (the tiled causal
kernel on float32 and bfloat16 caches vs one masked call over [T, L]).

Shapes default to smollm2-135m's (30 layers, 9 query heads, 3 kv heads, head_dim 64); figures
are milliseconds for all layers, medians of the repeats; GB/s = cache bytes read / time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ..cache import KVCache
from ..models import attnkernel
from ..models.attention import (
    PROMPT_ROWS,
    attend_keys,
    attend_prompt_rows,
    attend_tiled,
    decode_kernel,
    make_span,
)
from ..models.plan import layer_path


def _median_ms(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in fns.items():  # interleaved: every variant sees the same load
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def decode_figures(
    ctx: int, rows: int, layers: int, n_h: int, n_kv: int, hd: int, repeats: int
) -> dict:
    """`rows` query rows ending at position ctx (a verification forward; 1 = a decode step)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, n_h, rows, hd, generator=g)
    qk = q[0]
    lo = torch.zeros(rows, dtype=torch.long)
    hi = torch.arange(ctx - rows + 1, ctx + 1)
    kernel = attnkernel.load() is not None
    fns = {}
    for dt, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        ks = [torch.randn(1, n_kv, ctx, hd, generator=g).to(dt) for _ in range(layers)]
        vs = [torch.randn(1, n_kv, ctx, hd, generator=g).to(dt) for _ in range(layers)]

        def grouped(ks=ks, vs=vs):  # torch's path: one grouped SDPA call per row
            for k, v in zip(ks, vs):
                for t in range(rows):
                    e = int(hi[t])
                    attend_keys(q[:, :, t : t + 1], k[:, :, :e], v[:, :, :e], None, hd**-0.5, None)

        fns[f"{name} torch"] = grouped
        if kernel:
            fns[f"{name} veridraft"] = lambda ks=ks, vs=vs: [
                attnkernel.rows(qk, k, v, lo, hi, None, hd**-0.5, None) for k, v in zip(ks, vs)
            ]
    return _median_ms(fns, repeats)


def prompt_attention(q, cache: KVCache, layer: int, scale: float):
    """A prefill's attention on one layer from position 0, along the path a forward takes
    there (plan.layer_path): the decode kernel's prompt rows or torch's tiles."""
    t = q.shape[2]
    path = layer_path(
        t,
        make_span(0, t, None, None),
        kernel=decode_kernel(cache, layer, q.shape[-1]),
        prompt_kernel=attnkernel.for_prompts(cache.k[layer].dtype),
    )
    if path == PROMPT_ROWS:
        return attend_prompt_rows(q, cache.k[layer], cache.v[layer], 0, None, scale, None)
    return attend_tiled(q, cache, layer, 0, None, scale, None)


def prefill_figures(t: int, layers: int, n_h: int, n_kv: int, hd: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    cache, half = KVCache(layers, n_kv, hd, t), KVCache(layers, n_kv, hd, t, torch.bfloat16)
    for i in range(layers):
        cache.k[i].copy_(torch.randn(cache.k[i].shape, generator=g))
        cache.v[i].copy_(torch.randn(cache.v[i].shape, generator=g))
        half.k[i].copy_(cache.k[i]), half.v[i].copy_(cache.v[i])
    q = torch.randn(1, n_h, t, hd, generator=g)
    mask = torch.ones(t, t, dtype=torch.bool).tril()

    def masked():
        for i in range(layers):
            F.scaled_dot_product_attention(
                q, cache.k[i], cache.v[i], attn_mask=mask, scale=hd**-0.5, enable_gqa=True
            )

    def tiled(cache=cache):
        for i in range(layers):
            prompt_attention(q, cache, i, hd**-0.5)

    return _median_ms(
        {
            "one [T, L] mask": masked,
            "f32 tiled causal": tiled,
            "bf16 tiled causal": lambda: tiled(half),
        },
        repeats,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m veridraft.bench.attention")
    p.add_argument("--contexts", default="200,2048,7400", help="decode contexts (positions)")
    p.add_argument("--rows", default="1,8", help="query rows per forward (1: a decode step)")
    p.add_argument(
        "--prompts", default="2048,4096", help="prompt lengths for prefill attention (0: none)"
    )
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", default="9,3,64", help="query heads, kv heads, head_dim")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n_h, n_kv, hd = (int(x) for x in a.heads.split(","))
    print(f"{a.layers} layers, {n_h}/{n_kv} heads, head_dim {hd}, {a.threads} threads; ms, median")
    if attnkernel.load() is None:
        print("veridraft's decode kernel is not available here: torch's figures only")
    for ctx in (int(x) for x in a.contexts.split(",")):
        for rows in (int(x) for x in a.rows.split(",")):
            r = decode_figures(ctx, rows, a.layers, n_h, n_kv, hd, a.repeats)
            gb = {"f32": 4, "bf16": 2}
            cells = [
                f"{k} {v:.2f} ({2 * a.layers * n_kv * ctx * hd * gb[k.split()[0]] / v / 1e6:.1f} GB/s)"
                for k, v in r.items()
            ]
            print(f"{rows} row(s) @{ctx}: " + ", ".join(cells))
    for t in (int(x) for x in a.prompts.split(",") if x.strip() and int(x) > 0):  # 0: none
        r = prefill_figures(t, a.layers, n_h, n_kv, hd, max(1, a.repeats // 2))
        print(f"prompt attention T={t}: " + ", ".join(f"{k} {v:.0f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
