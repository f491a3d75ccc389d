"""Precision modes: how the weights of a native model are stored and multiplied.

Chosen at load (`veridraft.load(name, precision=...)`, `from_folder(..., precision=...)`,
`--precision`). The model is always built and loaded in float32; `apply_precision` then swaps
every `nn.Linear` (and the tied output head) for a `PackedLinear` and, for the packed modes, the
embedding table for a half-size copy (looked up, then widened to float32). Norms, RoPE,
attention and the residual stream stay float32 in every mode; the KV cache is bfloat16 in `bf16`
(and `q4`, `q4a8`) where veridraft's decode attention kernel runs (models/attnkernel.py), else float32.

| mode    | weights                         | activations into the matmul | accumulation |
|---------|---------------------------------|-----------------------------|--------------|
| `fp32`  | float32                         | float32                     | float32      |
| `fp16w` | float16, fbgemm-packed          | float32                     | float32      |
| `bf16`  | bfloat16, oneDNN-prepacked      | bfloat16 (rounded)          | float32, output rounded to bfloat16 |
| `q4`    | the GGUF's own 4-bit blocks (models/q4.py), int4-packed | bfloat16 (rounded) | float32, output rounded to bfloat16 |
| `q4a8`  | the same blocks as `q4` | signed bytes, one float32 scale per 32 (AVX512-VNNI) | int32 per group, then float32 |

`bf16` is the fast mode on CPUs with AMX or AVX-512 BF16: with the weights reordered once into
oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, batch-size hint 16) a matmul
over 1..16 rows costs about the same, and reads half the bytes of fp32. Without the prepack
(plain `F.linear` on bf16 tensors) oneDNN reorders the weights on every call and one row takes a
slow path: 1.5-2x slower. It is the least accurate mode (activations and outputs in bfloat16).

Measured but not shipped (docs/precision.md has the numbers): weight-only int8 (`torch._weight_int8pack_mm`, bf16 activations: ~20% faster than
fp16w at M=1, slower from M=4 on) and dynamic int8 with per-token activation scales
(`torch._int_mm`: batch-invariant and flat in M, but slower than fp16w up to M=8).

Every kernel here is *batch-invariant*: row i of `linear(x)` is bitwise the same whatever the
other rows of x are (small calls are padded where oneDNN or fbgemm would change kernels:
_probe_row_floor; on AVX2-only CPUs that costs fp16w dearly, see docs/precision.md; checked for
M = 1..16 on the catalog shapes by
`python -m veridraft.models.precision`, and by tests/models/test_precision.py). That is what
keeps speculative decoding exactly equal to plain decoding *in the same mode*: the verification
forward over k+1 rows computes the same numbers as k+1 one-row forwards. (float32 MKL is not
strictly batch-invariant - rows move by ~3e-6 between M=1 and M=16 - which only matters at exact
argmax ties.) Dynamic int8 with a per-tensor activation scale is batch-variant by construction
and is not offered.

`python -m veridraft.models.precision` is the micro-benchmark the modes were chosen from: each
kernel on the real shapes at M = 1, 2, 4, 8, 16, plus its batch-invariance check.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import attnkernel
from .config import checkpoint_key, hf_linear_parts

PRECISIONS = ("fp32", "fp16w", "bf16")  # the modes packed from the float32 weights
# modes built from the GGUF's own quantized blocks (models/q4.py): they need the source GGUF
GGUF_PRECISIONS = ("q4", "q4a8")
ALL_PRECISIONS = PRECISIONS + GGUF_PRECISIONS

# fbgemm's fp16 entry points warn "deprecated" (once per process, from C++); the kernels are what
# we want, so the first pack and the first call run under a filter (see _quiet_fbgemm).
warnings.filterwarnings("ignore", message=r"fbgemm_.*is deprecated")
_fbgemm_warned = False


def _quiet_fbgemm() -> None:
    """Trigger fbgemm's one-time deprecation warnings with them filtered, so that they do not
    reach users (pytest, for one, resets the module-level filter above)."""
    global _fbgemm_warned
    if _fbgemm_warned:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = torch.fbgemm_pack_gemm_matrix_fp16(torch.zeros(8, 8))
        torch.fbgemm_linear_fp16_weight_fp32_activation(torch.zeros(1, 8), p, None)
    _fbgemm_warned = True


_HALF = {"fp16w": torch.float16, "bf16": torch.bfloat16}
VERIFY_ROWS = 17  # rows of the largest verification forward (decode's max_draft 16, + 1)
# Prefill-sized matmuls run in blocks of this many rows from the call's first row. With AMX
# (Intel Xeon), oneDNN splits a matmul between threads by its number of rows (so does fbgemm's
# fp16 kernel on AVX2-only CPUs, from 31 rows), so a row's result
# depended on the call's size (a 1536x576 matmul: rows 0..17 moved between 64 and 768 rows), and
# a prompt prefilled in 1024-token chunks differed from one prefilled in one block. A block's
# rows depend only on the block, and every chunk boundary (decode.PREFILL_CHUNK) is a block
# boundary. Measured cost: the linears of a 2048-row smollm2-135m layer ~18% slower, ~3% of an
# 8k prefill (docs/performance/intel-xeon-amx.md).
ROW_BLOCK = 512
# (out, in, bias), threads -> rows bf16 matmuls of that shape are padded to (PackedLinear)
_ROW_FLOORS: dict[tuple, int] = {}


class PackedLinear(nn.Module):
    """y = x @ W.T + b with W stored per `precision`; x and y are float32 [M, in] / [M, out]."""

    def __init__(self, weight: Tensor, bias: Tensor | None, precision: str) -> None:
        super().__init__()
        if precision not in _HALF:
            raise ValueError(f"PackedLinear: unknown precision {precision!r}")
        self.precision = precision
        self.out_features, self.in_features = weight.shape
        w = weight.detach().float().contiguous()
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self.packed = None
        self.onednn = None
        self.pad = 0
        self._floor, self._floor_threads = 1, 0  # row floor, and the thread count it is for
        if precision == "fp16w":
            # opaque fbgemm blob (not a tensor of the weights): kept as a plain attribute
            _quiet_fbgemm()
            self.packed = torch.fbgemm_pack_gemm_matrix_fp16(w)
            self.weight = None
        else:
            # oneDNN's bf16 kernels give rows that depend on the number of rows when the inner
            # dimension is not a multiple of its 32-wide tiles (seen with K = 112); zero columns
            # change no sum and make every K a whole number of tiles.
            self.pad = -self.in_features % 32
            self.register_buffer("weight", F.pad(w, (0, self.pad)).to(_HALF[precision]))
            self.onednn = _onednn_pack(self.weight)
            if self.onednn is not None:
                self.weight = None  # the blocked copy is the only one kept
        self.bias_half = None if bias is None else self.bias.to(_HALF[precision])

    @property
    def weight_nbytes(self) -> int:
        """Bytes of weights one forward reads (the packed fp16 blob hides its size)."""
        return self.out_features * self.in_features * 2 + (
            0 if self.bias is None else 4 * self.out_features
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:  # padding zero rows up to the row floor would run the full matmul
            return x.new_zeros(0, self.out_features)
        if self.packed is None:
            x = x.to(torch.bfloat16)
            if self.pad:
                x = F.pad(x, (0, self.pad))
        m = x.shape[0]
        if m <= VERIFY_ROWS:
            threads = torch.get_num_threads()
            if self._floor_threads != threads:  # the kernel choice depends on the thread count
                key = (self._shape, threads)
                self._floor = _ROW_FLOORS[key] if key in _ROW_FLOORS else self._probe_row_floor()
                self._floor_threads = threads
            if m < self._floor:
                return self._mm(F.pad(x, (0, 0, 0, self._floor - m)))[:m].float()
        if m > ROW_BLOCK:
            return torch.cat([self._mm(b) for b in x.split(ROW_BLOCK)]).float()
        return self._mm(x).float()

    @property
    def _shape(self) -> tuple:
        return (
            self.precision,
            self.out_features,
            self.in_features + self.pad,
            self.bias is not None,
        )

    def _mm(self, x: Tensor, weight: Tensor | None = None, packed=None, bias=None) -> Tensor:
        """x @ W.T + b in this mode's kernel, or with a probe's weight and bias when given."""
        if self.packed is not None:  # fp16w: fbgemm, float32 in and out
            if weight is None:
                packed, bias = self.packed, self.bias
            return torch.fbgemm_linear_fp16_weight_fp32_activation(x, packed, bias)
        if weight is None:
            weight, packed, bias = self.weight, self.onednn, self.bias_half
        if packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def _probe_row_floor(self) -> int:
        """The fewest rows to run this shape's matmuls with so that no row's result depends on
        the other rows, for up to VERIFY_ROWS rows.

        oneDNN and fbgemm pick their kernels by the number of rows: on an AVX512-BF16 CPU
        without AMX (AMD EPYC) one row of a 640x2048 or 576x1536 bf16 matmul takes another
        kernel, with another order of its sums, than two or more; on an AVX2-only CPU fbgemm's
        fp16 kernels give other sums for 1, 2, 7 and 14 rows than for 16. A verification
        forward would then not reproduce plain decoding; padding with zero rows up to the floor
        keeps every call on one kernel. The kernel depends on the shape, not on the numbers, so
        the probe packs a synthetic weight of this shape whose entries span 2^-8..2^8: their
        sums cancel, and a different order of summation shows in the output (with plain random
        data it mostly rounds away). Measured once per mode, shape and thread count."""
        g = torch.Generator().manual_seed(0)
        n, k = self.out_features, self.in_features + self.pad
        half = _HALF[self.precision]

        def wild(*shape: int) -> Tensor:
            scale = torch.exp2(torch.randint(-8, 9, shape, generator=g).float())
            return (torch.randn(*shape, generator=g) * scale).to(half)

        w, b, x = wild(n, k), (None if self.bias is None else wild(n)), wild(VERIFY_ROWS, k)
        if self.packed is not None:  # fp16w: fbgemm packs float32 weights, runs float32 rows
            w, x = w.float(), x.float()
            b = None if b is None else b.float()
            packed = torch.fbgemm_pack_gemm_matrix_fp16(w)
        else:
            packed = _onednn_pack(w) if self.onednn is not None else None
        for floor in (1, 2, 4, 8, 16, VERIFY_ROWS):

            def run(rows: Tensor, floor: int = floor) -> Tensor:
                m = rows.shape[0]
                return self._mm(F.pad(rows, (0, 0, 0, max(0, floor - m))), w, packed, b)[:m]

            one = torch.cat([run(x[i : i + 1]) for i in range(VERIFY_ROWS)])
            if all(torch.equal(run(x[:m]), one[:m]) for m in range(2, VERIFY_ROWS + 1)):
                break
        else:
            warnings.warn(
                f"{self.precision} matmul {n}x{k} gives rows that depend on the number of rows "
                f"on this CPU: speculative decoding in {self.precision} may differ from plain "
                f"{self.precision} decoding; use precision='fp32' for exact match",
                stacklevel=2,
            )
            floor = 1
        if self.packed is not None and floor > 1:
            _warn_fp16w_floor(floor)
        _ROW_FLOORS[(self._shape, torch.get_num_threads())] = floor
        return floor

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, precision={self.precision}"
        )


_fp16w_floor_warned = False


def _warn_fp16w_floor(floor: int) -> None:
    """Say once that fp16w pays for its exactness here: fbgemm's cost grows with the rows (it is
    flat in them for oneDNN's bf16 kernels, where a floor costs next to nothing)."""
    global _fp16w_floor_warned
    if not _fp16w_floor_warned:
        _fp16w_floor_warned = True
        warnings.warn(
            f"fp16w on this CPU: fbgemm's fp16 kernels sum in another order for some numbers of "
            f"rows, so matmuls of fewer than {floor} rows run padded to {floor} to keep "
            "speculative decoding exact; one-token steps cost several times more. precision="
            "'q4' or 'bf16' is faster here (measure: veridraft bench --precision ...)",
            stacklevel=2,
        )


def _onednn_pack(w: Tensor):
    """w (bf16) reordered for oneDNN's small-batch kernels, or None where this torch build has
    no oneDNN (then F.linear on the bf16 tensor is used: slower, and its batch invariance is
    only what tests/models/test_precision.py checks on that machine)."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        probe = torch.zeros(1, w.shape[1], dtype=torch.bfloat16)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        return packed
    except (RuntimeError, AttributeError):
        return None


def apply_precision(model: nn.Module, precision: str, reference=None) -> nn.Module:
    """Swap model's linears (in place) for `precision`'s kernels; fp32 leaves it as it is.

    A tied head is packed from the embedding table, and the table itself is replaced by a
    half-size copy in the mode's 16-bit type (rows widened to float32 at lookup), so a packed
    model never holds the float32 table. A linear whose weight is a meta tensor (models.
    from_folder builds packed models so) reads its float32 weight from `reference`, the
    checkpoint, just before packing it: loading holds one float32 matrix at a time.
    """
    if precision == "fp32":
        return model
    if precision in GGUF_PRECISIONS:
        raise ValueError(f"precision {precision!r} is built from a GGUF: use models.q4.apply_q4")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; supported: {', '.join(PRECISIONS)}")
    emb = getattr(model, "tok_embeddings", None)
    # Only the parents are listed: a list of every module would keep each replaced nn.Linear,
    # and so all the float32 weights, alive until the end (peak = float32 + packed model). The
    # head, the largest, is packed last, into the room its predecessors' float32 weights left.
    parents = [
        (name, m)
        for name, m in model.named_modules()
        if any(isinstance(c, nn.Linear) for c in m.children())
    ]
    parents.sort(key=lambda nm: nm[1] is model)
    for prefix, parent in parents:
        for name in [n for n, c in parent.named_children() if isinstance(c, nn.Linear)]:
            child = getattr(parent, name)
            weight = child.weight
            if weight.is_meta:
                weight = _from_checkpoint(model, reference, f"{prefix}.{name}".lstrip("."))
            setattr(parent, name, PackedLinear(weight, child.bias, precision))
            del child, weight  # its float32 weight goes now, before the next one is packed
    if isinstance(emb, nn.Embedding):
        emb.weight = nn.Parameter(emb.weight.detach().to(_HALF[precision]), requires_grad=False)
    model.precision = precision
    model.rowwise_attention = True  # see Transformer.rowwise_attention
    model.cache_dtype = attnkernel.cache_dtype(_HALF[precision])  # see Transformer.cache_dtype
    return model


def _from_checkpoint(model: nn.Module, reference, name: str) -> Tensor:
    """The float32 weight of native linear `name`, fused from the checkpoint's tensors."""
    if reference is None:
        raise ValueError(f"{name} has no weights (meta): pass apply_precision(reference=...)")
    parts = [reference[checkpoint_key(reference, k)] for k in hf_linear_parts(model.config, name)]
    parts = [t.float() if t.dtype != torch.float32 else t for t in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def weight_nbytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one plain-decoding step reads: every linear's weights (packed sizes for
    PackedLinear), norms and other parameters, one embedding row; tied tensors once."""
    seen: dict[int, int] = {}
    total = 0
    packed = [m for m in model.modules() if hasattr(m, "weight_nbytes")]  # PackedLinear, Q4Linear
    total += sum(m.weight_nbytes for m in packed)
    skip = set()
    for m in packed:
        skip.update(id(t) for t in [*m.parameters(), *m.buffers()])
        skip.update(id(t) for t in (getattr(m, "weight", None),) if t is not None)
    linear_ptrs = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)}
    for m in model.modules():
        if isinstance(m, nn.Embedding) and m.weight.data_ptr() not in linear_ptrs:
            skip.add(id(m.weight))
            total += m.weight.shape[-1] * m.weight.element_size()
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in skip or not t.is_floating_point() or t.numel() == 0:
            continue
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return total + sum(seen.values())


def agreement(reference: nn.Module, model: nn.Module, sequences, starts) -> dict[str, float]:
    """How closely `model` (some precision) follows `reference` (fp32) on given token sequences,
    teacher-forced: over positions start-1 .. len-2 of each sequence (the predictions of its
    continuation), the share of positions where both argmaxes agree and the largest absolute
    logit difference (float32 logits)."""
    agree = total = 0
    max_diff = 0.0
    with torch.inference_mode():
        for seq, start in zip(sequences, starts):
            ids = torch.as_tensor(seq, dtype=torch.long)
            n = len(ids) - start + 1  # predictions of ids[start:] plus the next token
            outs = []
            for net in (reference, model):
                cache = net.new_cache(len(ids))
                outs.append(net(ids, cache, num_logits=n))
            a, b = outs
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += n
            max_diff = max(max_diff, float((a - b).abs().max()))
    return {"argmax_agreement": agree / total, "positions": total, "max_logit_diff": max_diff}


# ---- micro-benchmark: python -m veridraft.models.precision ----

SHAPES = {
    "smollm2-135m": [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)],
    "gemma3-270m": [(1536, 640), (640, 1024), (4096, 640), (640, 2048), (262144, 640)],
}


def _kernels(w: Tensor) -> dict[str, object]:
    out: dict[str, object] = {"fp32": lambda x: F.linear(x, w)}
    for p in ("fp16w", "bf16"):
        out[p] = PackedLinear(w, None, p)
    s = w.abs().amax(1) / 127
    wq = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
    sb = s.to(torch.bfloat16)
    out["int8w (bf16 act)"] = lambda x: torch._weight_int8pack_mm(
        x.to(torch.bfloat16), wq, sb
    ).float()
    wqt = wq.t().contiguous()

    def a8w8(x: Tensor) -> Tensor:  # per-token activation scale: integer accumulation
        xs = x.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        return torch._int_mm(torch.round(x / xs).to(torch.int8), wqt).float() * xs * s

    out["int8 dyn (per-token)"] = a8w8
    return out


def micro_benchmark(models=("smollm2-135m",), ms=(1, 2, 4, 8, 16), repeats=9, threads=1):
    """Per kernel and shape: best-of-`repeats` CPU µs (thread time) at each M, kernels and M
    interleaved, and the largest change of row 0 between M=1 and any M (0.0 = batch-invariant).

    CPU time of one thread, best of N, estimates each kernel's own cost on a shared machine,
    where wall-clock medians pick up other processes' time slices."""
    import time

    torch.set_num_threads(threads)
    clock = time.thread_time if threads == 1 else time.perf_counter
    rows = []
    gen = torch.Generator().manual_seed(0)
    for model in models:
        for n, k in SHAPES[model]:
            w = torch.randn(n, k, generator=gen) * 0.05
            x = torch.randn(max(ms), k, generator=gen)
            kernels = _kernels(w)
            best = {(name, m): float("inf") for name in kernels for m in ms}
            drift = {}
            with torch.inference_mode():
                for name, fn in kernels.items():
                    ref = fn(x[:1])
                    drift[name] = max(float((fn(x[:m])[:1] - ref).abs().max()) for m in ms)
                for _ in range(repeats if n * k < 3e7 else max(3, repeats // 3)):
                    for m in ms:
                        xm = x[:m].contiguous()
                        for name, fn in kernels.items():
                            t = clock()
                            fn(xm)
                            best[name, m] = min(best[name, m], clock() - t)
            for name in kernels:
                times = [best[name, m] * 1e6 for m in ms]
                rows.append(
                    {
                        "model": model,
                        "shape": f"{n}x{k}",
                        "kernel": name,
                        "us": times,
                        "row_drift": drift[name],
                    }
                )
                print(
                    f"| {model} | {n}x{k} | {name} | "
                    + " | ".join(f"{t:,.0f}" for t in times)
                    + f" | {drift[name]:.1e} |",
                    flush=True,
                )
    return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="precision kernels on the catalog shapes")
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    print("| model | W (out x in) | kernel | M=1 | M=2 | M=4 | M=8 | M=16 | row drift |")
    print("|---|---|---|---|---|---|---|---|---|")
    micro_benchmark(a.models, repeats=a.repeats, threads=a.threads)
