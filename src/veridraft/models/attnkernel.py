"""veridraft's decode attention kernel (attnkernel.cpp): a few query rows over a long KV cache.

A decode step at a long context is mostly the cache's bytes: smollm2-135m at 7,400 positions
reads ~170 MB of bfloat16 keys and values beside ~270 MB of bfloat16 weights. torch's
attention for one query row ran at ~13 GB/s on a bfloat16 cache (a Zen 5 core); this kernel
reads each cached row once per KV head for the whole GQA group, in blocks split over the
threads. It is row-invariant by construction (see the .cpp), so one call serves plain
decoding, verification forwards (every row bitwise the one-token step at its position), token
trees and sparse views. Built like q4 mode's kernel (models/kernels.py); without AVX512-BF16 or
a compiler, or with ``VERIDRAFT_ATTN_KERNEL=torch``, attention keeps torch's kernels."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import kernels

SOURCE = Path(__file__).with_name("attnkernel.cpp")
_loaded: dict[str, object] = {}


def load() -> object | None:
    """The compiled kernel, or None when attention keeps torch's kernels (no AVX512-BF16, a
    failed build, which warns once, or VERIDRAFT_ATTN_KERNEL=torch)."""
    if "module" in _loaded:
        return _loaded["module"]
    module = None
    if os.environ.get("VERIDRAFT_ATTN_KERNEL", "").lower() != "torch" and kernels.cpu_supported():
        try:
            module = kernels.build("attn", SOURCE, kernels.FLAGS, "the decode attention kernel")
        except Exception as e:  # attention still works through torch, slower at long contexts
            import warnings

            warnings.warn(
                "attention uses torch's kernels: building veridraft's failed "
                f"({str(e).strip().splitlines()[-1][:200]})",
                stacklevel=2,
            )
    _loaded["module"] = module
    return module


def cache_dtype(activations: torch.dtype) -> torch.dtype:
    """The KV cache's element type for a mode whose activations are `activations`: bfloat16 for
    the bf16 modes where this kernel runs (half the bytes every long-context step reads), else
    float32. Without the kernel torch's attention widens a bfloat16 cache on every call, and
    decoding was no faster with it."""
    if activations == torch.bfloat16 and load() is not None:
        return torch.bfloat16
    return torch.float32


def for_prompts(cache_dtype: torch.dtype) -> bool:
    """Whether prompt attention (prefill) runs through this kernel too, in slices of rows,
    rather than through torch's flash kernel in tiles. Over a bfloat16 cache on a CPU without
    AMX it does: there torch widens the tiles and multiplies in float32, and a prefill of 8,192
    tokens of smollm2-135m spent 19-21 of its 25-27 s in prompt attention on an AMD EPYC (Zen 4),
    where this kernel's bfloat16 arithmetic takes ~2.5x less (docs/performance/amd-epyc-zen4.md). With AMX
    torch's tiles run on it and stay. ``VERIDRAFT_PROMPT_ATTN=kernel|torch`` overrides."""
    choice = os.environ.get("VERIDRAFT_PROMPT_ATTN", "").strip().lower()
    if choice not in ("", "kernel", "torch"):
        from ..errors import VeridraftError

        raise VeridraftError(
            f"VERIDRAFT_PROMPT_ATTN={choice!r}: use 'kernel', 'torch' or leave it unset"
        )
    if choice == "torch" or cache_dtype != torch.bfloat16 or load() is None:
        return False
    return choice == "kernel" or "amx_bf16" not in kernels.cpu_flags()


def rows(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    ext: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """q float32 [n_h, T, hd] (last dim contiguous); k, v one layer's cache [1, n_kv, L, hd];
    row t reads cached positions [lo[t], hi[t]) and then ext[h, t] (int64 [1|n_kv, 1|T, E],
    entries < 0 skipped). Returns float32 [T, n_h * hd]."""
    return load().rows(q, k, v, lo, hi, ext, scale, softcap or 0.0)
