"""Plain-decoding speed: veridraft vs transformers `generate()`, and the memory-bandwidth bound.

    python -m veridraft.bench.ar_speed [--model smollm2-135m] [--prompts N] [--max-new-tokens N]

Plain decoding reads every weight (and the KV cache so far) once per token, so on a CPU
tokens/s <= copy bandwidth / bytes read per token. Both engines run the same prompt ids,
interleaved, after a warm-up, with the same thread count; medians are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from ..defaults import DEFAULT_MODEL
from ..errors import VeridraftError

SAMPLE_PROMPTS = [
    "Explain in three sentences why the sky is blue.",
    "Write a short poem about the sea.",
    "What are the main differences between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet in a paragraph.",
    "Give me five tips for better sleep.",
    "How does a refrigerator keep food cold?",
    "Describe the water cycle for a ten-year-old.",
    "What is the capital of Australia, and why is it not Sydney?",
]


def copy_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Best-of-`repeats` copy bandwidth in bytes/s (STREAM convention: read + write counted)."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def weight_bytes_per_token(net: torch.nn.Module) -> int:
    """Bytes of weights one plain-decoding step reads (packed precisions counted at their
    stored size; an input embedding table that is not the head costs one row)."""
    from ..models.precision import weight_nbytes_per_token

    return weight_nbytes_per_token(net)


def kv_bytes_per_position(net) -> int:
    """Bytes of keys + values stored per cached position (all layers), from the cache contract."""
    try:
        cache = net.new_cache(1)
    except Exception:
        return 0
    total = 0
    for k, v in zip(cache.k, cache.v):
        for t in (k, v):
            total += t.numel() * t.element_size() // max(1, t.shape[2])
    return total


def bandwidth_bound(net, mean_context: float, bandwidth: float | None = None) -> dict:
    """The tokens/s ceiling of plain decoding and what it is made of."""
    bw = bandwidth if bandwidth is not None else copy_bandwidth()
    wb = weight_bytes_per_token(net)
    kvb = kv_bytes_per_position(net) * float(mean_context)
    per_token = wb + kvb
    return {
        "copy_bandwidth_GBps": bw / 1e9,
        "weight_bytes_per_token": wb,
        "kv_bytes_per_token": int(kvb),
        "mean_context_tokens": float(mean_context),
        "bytes_per_token": int(per_token),
        "bound_tokens_per_s": bw / per_token if per_token else None,
    }


def _hf_generate(
    hf, ids: list[int], max_new_tokens: int, eos: list[int]
) -> tuple[list[int], float]:
    from transformers import GenerationConfig

    gc = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else None,
    )
    x = torch.tensor([ids])
    with torch.inference_mode():
        t = time.perf_counter()
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gc)
        dt = time.perf_counter() - t
    return out[0, len(ids) :].tolist(), dt


def _ours_generate(model, ids: list[int], max_new_tokens: int) -> tuple[list[int], float]:
    from ..generate import generate_ids

    t = time.perf_counter()
    new, _ = generate_ids(model, ids, max_new_tokens=max_new_tokens, seed=0)
    return new, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m veridraft.bench.ar_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=4, help="number of prompts (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument(
        "--precision",
        default="fp32",
        help="veridraft's mode: fp32 (default), fp16w, bf16; transformers always runs float32",
    )
    args = p.parse_args(argv)
    try:
        return _run(args)
    except VeridraftError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import veridraft

    from ..generate import prompt_ids_for

    torch.set_num_threads(args.threads)
    model = veridraft.load(args.model, precision=args.precision)
    prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(args.prompts)]
    ids_list = [prompt_ids_for(model, [{"role": "user", "content": p}]) for p in prompts]
    eos = sorted(model.tokenizer.eos_ids)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        from ..models.catalog import float32_folder

        hf = AutoModelForCausalLM.from_pretrained(
            float32_folder(model.path), dtype=torch.float32
        ).eval()
    # warm-up
    _ours_generate(model, ids_list[0], min(16, args.max_new_tokens))
    if hf is not None:
        _hf_generate(hf, ids_list[0], min(16, args.max_new_tokens), eos)
    ours, theirs, same, ctx = [], [], 0, []
    for i, ids in enumerate(ids_list):
        runs = [("ours", lambda ids=ids: _ours_generate(model, ids, args.max_new_tokens))]
        if hf is not None:
            runs.append(("hf", lambda ids=ids: _hf_generate(hf, ids, args.max_new_tokens, eos)))
        if i % 2:
            runs.reverse()
        outs = {}
        for name, fn in runs:
            new, dt = fn()
            outs[name] = new
            (ours if name == "ours" else theirs).append(len(new) / dt)
        ctx.append(len(ids) + len(outs["ours"]) / 2)
        same += hf is not None and outs["ours"] == outs["hf"]
        print(
            f"prompt {i + 1}/{len(ids_list)}: {len(ids)} prompt tokens, "
            f"{len(outs['ours'])} new; veridraft {ours[-1]:.1f} tok/s"
            + (f", transformers {theirs[-1]:.1f} tok/s" if theirs else ""),
            file=sys.stderr,
        )
    bound = bandwidth_bound(model.net, statistics.mean(ctx))
    med_ours = statistics.median(ours)
    print(
        f"model {model.name} ({model.precision}), {args.threads} threads, {len(ids_list)} prompts, "
        f"{args.max_new_tokens} new tokens max, torch {torch.__version__}"
    )
    print(f"veridraft plain decoding:    {med_ours:7.1f} tok/s (median)")
    if theirs:
        med_hf = statistics.median(theirs)
        print(f"transformers generate():     {med_hf:7.1f} tok/s (median)")
        print(
            f"ratio veridraft / transformers: {med_ours / med_hf:.2f}x; "
            f"identical greedy ids on {same}/{len(ids_list)} prompts"
        )
    b = bound
    print(
        f"memory-bandwidth bound:      {b['bound_tokens_per_s']:7.1f} tok/s "
        f"(copy bandwidth {b['copy_bandwidth_GBps']:.1f} GB/s; per token "
        f"{b['weight_bytes_per_token'] / 1e6:.0f} MB weights + {b['kv_bytes_per_token'] / 1e6:.1f} MB "
        f"KV at {b['mean_context_tokens']:.0f} tokens of context)"
    )
    print(
        f"veridraft at {100 * med_ours / b['bound_tokens_per_s']:.0f}% of the bound"
        + (
            f", transformers at {100 * statistics.median(theirs) / b['bound_tokens_per_s']:.0f}%"
            if theirs
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
