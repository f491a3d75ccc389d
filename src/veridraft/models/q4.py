"""`precision="q4"`: the GGUF's own quantized blocks, kept quantized, multiplied as they are.

A model folder's GGUF is its model file (the float modes' float32 weights are the de-quantized
values of its blocks); this mode reads the blocks themselves, and de-quantizes the GGUF's other
tensors (embeddings, norms, biases) on load: no float32 copy is read or made. Every supported
block format is `w = u * s + z`: an unsigned code u and one float32 scale and zero per group of
a row (32 weights; Q6_K's sub-blocks are 16 wide, Q4_K's 32). Two kernels multiply them:

**veridraft's own kernel** (models/q4kernel.cpp, compiled once per machine; AVX512-BF16 CPUs,
and an AVX2 + FMA build for x86 CPUs without it). Scale and zero stay the GGUF's exact values;
the codes are expanded to bfloat16 once per 16 outputs x group and multiplied into up to 8
activation rows at a time (vdpbf16ps: exact products, float32 sums), so a forward over 8 tokens
reads the weights once. The AVX2 build widens the codes to float32 and multiplies them into 2
rows at a time with FMA (the same exact products, summed in another order). Codes are 4-bit
pairs, plus one or two bit masks for 5- and 6-bit codes; scales are float16 where that holds
the GGUF's values exactly (Q4_0..Q5_1, Q8_0), the K-quants' two levels as stored (Q4_K, Q6_K),
else float32. Bytes read per weight: Q4_K 0.59, Q4_0/Q4_1 0.625, Q5_x 0.75, Q6_K 0.91, Q8_0
1.125 (signed bytes).

A fused linear (q|k|v, gate|up) keeps each part in its own layout (one call per run of parts
that share one).

**torch's int4 kernel** (`aten._weight_int4pack_mm_for_cpu`, group 32, bfloat16 activations),
where the own kernel cannot be built or the CPU has neither build's instructions (q4kernel.load
says why). Its
scale and zero are bfloat16 (8-bit mantissa, where the GGUF stores float16 d, m, dmin and Q4_K's
up-to-17-bit products), each plane's output is rounded to bfloat16, a wider code is split into two
4-bit planes (u = lo + 16 hi, 1.25 bytes per weight), and a linear with a Q6_K part runs `bf16`
mode's kernel on its de-quantized weights. It re-expands the codes for every block of rows, so a
forward over 8 tokens costs ~2.5 one-token forwards.

Both round the activations to bfloat16, as in `bf16` mode. docs/precision.md gives the measured
difference from the de-quantized float32 model.

**`precision="q4a8"`**: the same blocks and the same kernel, but the activations go in as signed
bytes, one float32 scale per 32 inputs (d = max|x| / 127, llama.cpp's Q8_0 rule), multiplied with
AVX512-VNNI's `vpdpbusd` (64 byte products per instruction, twice `vdpbf16ps`'s 32) into exact
int32 sums per group; then `y += (isum * s) * d + z * (d * sum q)` in float32. A forward over
several tokens costs less than in q4 where the kernel is compute-bound; the activations lose
more than bfloat16 rounding does (agreement with fp32 in docs/precision.md). CPUs with
AVX512-BF16 have VNNI; elsewhere q4a8 is refused with a one-line error naming q4.

F16/BF16/F32 matrices and the other K- and I-quants have no path: loading fails naming the
tensor and its type. The embedding table is the de-quantized table in bfloat16 (one row read per
token), as in `bf16` mode.

Batch-invariant: either kernel's row i does not depend on the other rows, with bfloat16 or byte
activations (checked for M = 1..17 by tests/models/test_q4.py), and attention runs row by row as
in the other packed modes, so speculative decoding in q4 (q4a8) reproduces plain q4 (q4a8)
decoding exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import VeridraftError
from . import attnkernel, fused, q4kernel
from .base import checkpoint_key, hf_linear_parts
from .convert import GGUFTensor, read_gguf, read_gguf_tensors  # noqa: F401 (re-exported)
from .precision import PackedLinear

GROUP = 32  # the group of torch's int4 kernel, and of every block format but Q6_K
# GGUF type name -> (bytes per block, weights per block, bits of the unsigned code, group)
BLOCKS = {
    "Q4_0": (18, 32, 4, 32),
    "Q4_1": (20, 32, 4, 32),
    "Q4_K": (144, 256, 4, 32),
    "Q5_0": (22, 32, 5, 32),
    "Q5_1": (24, 32, 5, 32),
    "Q8_0": (34, 32, 8, 32),
    "Q6_K": (210, 256, 6, 16),
}
# types only the veridraft kernel takes (16-wide groups); with torch's kernel such a linear runs
# bf16 mode's kernel on its de-quantized weights
KERNEL_ONLY = ("Q6_K",)


def group_of(kind: str) -> int:
    """Weights per (scale, zero) pair of a block type."""
    return BLOCKS[kind][3]


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block, as float32 [blocks]."""
    return raw[:, at : at + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are weights 0..15, high nibbles 16..31 (Q4_0/Q4_1/Q5_x)."""
    return np.concatenate((qs & 15, qs >> 4), axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """4 bytes (little-endian 32 bits) -> bit j of weight j, j = 0..31, as 0/16."""
    bits = np.unpackbits(qh, axis=1, bitorder="little")
    return bits.astype(np.uint8) << 4


def _q6k(raw: np.ndarray):
    """Q6_K: 128 bytes of low nibbles, 64 of 2-bit high parts, 16 int8 scales, float16 d.
    Weight i of a block is d * sc[i / 16] * (q - 32), q = 6 bits (ggml's dequantize_row_q6_K)."""
    ql, qh = raw[:, :128].reshape(-1, 2, 64), raw[:, 128:192].reshape(-1, 2, 32)
    sc = raw[:, 192:208].copy().view(np.int8).astype(np.float32)
    lo = np.stack(
        (ql[:, :, :32] & 15, ql[:, :, 32:] & 15, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4), axis=2
    )
    hi = np.stack([(qh >> (2 * j)) & 3 for j in range(4)], axis=2)
    u = (lo | (hi << 4)).reshape(-1, 256).astype(np.uint8)
    s = _f16(raw, 208)[:, None] * sc  # exact: an 11-bit by 8-bit product
    return u, s, -32 * s


def two_level(kind: str, raw: np.ndarray, rows: int, cols: int):
    """A K-quant's scales as stored: (D, c, M, m) with s = D * c and z = M * m, D and M float32
    [rows, cols / 256], c and m int8 [rows, cols / group]; None for the other types."""
    if kind not in ("Q4_K", "Q6_K"):
        return None
    nbytes = BLOCKS[kind][0]
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    if kind == "Q6_K":
        d = _f16(raw, 208)
        sc = raw[:, 192:208].copy().view(np.int8)
        out = (d, sc, -32 * d, sc)
    else:
        q = raw[:, 4:16]
        sc = np.concatenate((q[:, 0:4] & 63, (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)), 1)
        mn = np.concatenate((q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)), 1)
        out = (_f16(raw, 0), sc.astype(np.int8), -_f16(raw, 2), mn.astype(np.int8))
    return tuple(a.reshape(rows, -1) for a in out)


def decode_blocks(kind: str, raw: np.ndarray, rows: int, cols: int):
    """GGUF blocks of a [rows, cols] matrix -> (u uint8 [rows, cols], s, z float32
    [rows, cols / group_of(kind)]) with weight = u * s + z exactly (float32 arithmetic, as
    GGUF's own de-quantization)."""
    if kind not in BLOCKS:
        raise KeyError(kind)
    nbytes, per, _, group = BLOCKS[kind]
    if cols % per:
        raise VeridraftError(f"a {kind} row of {cols} weights is not whole blocks of {per}")
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, nbytes)
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _f16(raw, 0)
        if kind == "Q8_0":
            u = (raw[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            z = -128 * d
        elif kind == "Q4_0":
            u, z = _nibbles(raw[:, 2:]), -8 * d
        elif kind == "Q4_1":
            u, z = _nibbles(raw[:, 4:]), _f16(raw, 2)
        elif kind == "Q5_0":
            u, z = _nibbles(raw[:, 6:]) | _high_bits(raw[:, 2:6]), -16 * d
        else:  # Q5_1
            u, z = _nibbles(raw[:, 8:]) | _high_bits(raw[:, 4:8]), _f16(raw, 2)
        s = d
    elif kind == "Q6_K":
        u, s, z = _q6k(raw)
    else:  # Q4_K: d, dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes of codes
        d, dmin = _f16(raw, 0), _f16(raw, 2)
        q = raw[:, 4:16].astype(np.uint8)
        sc = np.empty((len(raw), 8), np.uint8)
        mn = np.empty((len(raw), 8), np.uint8)
        sc[:, :4], mn[:, :4] = q[:, 0:4] & 63, q[:, 4:8] & 63
        sc[:, 4:] = (q[:, 8:12] & 15) | ((q[:, 0:4] >> 6) << 4)
        mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
        qs = raw[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
        u = np.stack((qs & 15, qs >> 4), axis=2).reshape(-1, 256)
        s = d[:, None] * sc.astype(np.float32)
        z = -(dmin[:, None] * mn.astype(np.float32))
    return (
        u.reshape(rows, cols),
        s.reshape(rows, cols // group).astype(np.float32),
        z.reshape(rows, cols // group).astype(np.float32),
    )


# w = (u - offset) * s for the types gguf de-quantizes as one product, u * s + z for the others:
# gguf's own formulas, so the values match without relying on u * s being exact
_OFFSET = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q6_K": 32}


def dequantize(
    kind: str, raw: np.ndarray, rows: int, cols: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """The [rows, cols] weights of a matrix's GGUF blocks: bit for bit gguf's own
    de-quantization (what transformers writes into a float32 folder), a few times faster: torch's
    arithmetic on row chunks, so no full-size intermediate. Checked against gguf's for every
    type in BLOCKS by tests/models/test_q4.py."""
    nbytes, per, _, group = BLOCKS[kind]
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // per * nbytes)
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, (1 << 22) // cols)  # ~4M weights a chunk
    for a in range(0, rows, step):
        b = min(rows, a + step)
        u, s, z = decode_blocks(kind, raw[a:b], b - a, cols)
        u = torch.from_numpy(u).view(b - a, -1, group)
        s = torch.from_numpy(s)[..., None]
        if kind in _OFFSET:
            w = (u.to(torch.int16) - _OFFSET[kind]).float() * s
        else:
            w = u.float() * s + torch.from_numpy(z)[..., None]
        out[a:b] = w.view(b - a, cols)
    return out


class Q4Linear(nn.Module):
    """y = x @ W.T + b with W as the GGUF's codes (see the module docstring); x and y are
    float32 [M, in] / [M, out]. `Q4Linear(u, s, z, bias, group)` holds one matrix;
    `Q4Linear.from_parts` a fused one (q|k|v, gate|up) whose parts may differ in block type."""

    precision = "q4"
    # q4a8: the activations as signed bytes per 32 inputs (AVX512-VNNI; apply_q4(a8=True))
    a8 = False

    def __init__(
        self, u: Tensor, s: Tensor, z: Tensor, bias: Tensor | None = None, group: int = GROUP
    ) -> None:
        super().__init__()
        self._build([(u, s, z, group)], bias)  # one matrix; scales as float16 or float32

    @classmethod
    def from_parts(cls, parts: list[tuple], bias: Tensor | None = None) -> Q4Linear:
        """parts: (u, s, z, group) or (u, s, z, group, two_level) per stacked matrix, in output
        order (two_level: see `two_level`)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._build(parts, bias)
        return self

    def _build(self, parts: list[tuple], bias: Tensor | None) -> None:
        self.out_features = sum(int(p[0].shape[0]) for p in parts)
        self.in_features = int(parts[0][0].shape[1])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        tiles = self.in_features % 32 == 0 and all(p[0].shape[0] % 16 == 0 for p in parts)
        self._kernel = q4kernel.load() if tiles else None
        if self._kernel is None and any(p[3] != GROUP for p in parts):
            raise VeridraftError(
                "a q4 linear with 16-wide groups (Q6_K) needs veridraft's q4 kernel "
                "(docs/precision.md); use precision='bf16'"
            )
        if self._kernel is not None:
            self._build_segments(parts)
        else:
            self._build_int4pack(parts)

    def _build_segments(self, parts: list[tuple]) -> None:
        # adjacent parts with the same layout and group run as one kernel call
        merged: list[list] = []
        for part in parts:
            u, s, z = (np.asarray(t.numpy() if isinstance(t, Tensor) else t) for t in part[:3])
            group, two = part[3], part[4] if len(part) > 4 else None
            top = int(u.max()) if u.size else 0
            kind = (q4kernel.layout(top), group, two is not None)
            if merged and merged[-1][0] == kind:
                last = merged[-1]
                last[1:4] = [np.concatenate((a, b)) for a, b in zip(last[1:4], (u, s, z))]
                if two is not None:
                    last[4] = tuple(np.concatenate((a, b)) for a, b in zip(last[4], two))
            else:
                merged.append([kind, u, s, z, two])
        self.segments, col = [], 0
        for i, ((_, group, _), u, s, z, two) in enumerate(merged):
            mode, scales, codes, sa, sb = q4kernel.pack(u, s, z, group, two)
            for name, t in (("codes", codes), ("sa", sa), ("sb", sb)):
                self.register_buffer(f"{name}{i}", t)
            n = u.shape[0]
            bias = None if self.bias is None else self.bias.data[col : col + n]
            self.segments.append((col, mode, group, scales, i, bias))
            col += n
        self.planes = 0  # int4pack's planes: none

    def _build_int4pack(self, parts: list[tuple]) -> None:
        u = torch.cat([torch.as_tensor(p[0]) for p in parts])
        s = torch.cat([torch.as_tensor(p[1]) for p in parts])
        z = torch.cat([torch.as_tensor(p[2]) for p in parts])
        self.segments = None
        self.planes = 2 if int(u.max()) > 15 else 1
        u32 = u.to(torch.int32)
        if self.planes == 1:
            codes, scale, zero = u32, s, z + 8 * s
        else:
            # u = lo + 16 hi. The hi plane gets zero 0 and code hi + shift, so that it adds
            # exactly 16 (hi + shift - 8) s: shift 8 where a row's hi fits in 0..7 (5-bit codes),
            # else 0 (8-bit codes, where the GGUF's zero -128 s cancels the 128 s this leaves).
            # The constant goes to the lo plane, whose bfloat16 zero then stays as small as the
            # GGUF's own (a zero of +-128 s would lose s/4 to rounding).
            hi = u32 >> 4
            shift = torch.where(hi.amax(1, keepdim=True) <= 7, 8, 0)
            codes = torch.cat((u32 & 15, (hi + shift).to(torch.int32)))
            scale = torch.cat((s, 16 * s))
            zero = torch.cat((z + 8 * s + 16 * (8 - shift) * s, torch.zeros_like(z)))
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        )
        # [in/32, rows, 2] as the kernel wants it
        sz = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("scales_zeros", sz)

    @property
    def kernel(self) -> str:
        """Which kernel runs this linear: "veridraft" or "aten-int4"."""
        return "aten-int4" if self.segments is None else "veridraft"

    @property
    def weight_nbytes(self) -> int:
        """Bytes of codes, scales and zeros one forward reads."""
        b = sum(t.numel() * t.element_size() for t in self.buffers())
        return b + (0 if self.bias is None else 4 * self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if self.segments is not None:
            if x.dtype != torch.float32 or not x.is_contiguous():
                x = x.float().contiguous()
            y = x.new_empty(x.shape[0], self.out_features)
            run = self._kernel.q4_linear
            buf = self._buffers
            flag = q4kernel.A8 if self.a8 else 0
            for col, mode, group, scales, i, bias in self.segments:
                run(x, y, col, buf[f"codes{i}"], buf[f"sa{i}"], buf[f"sb{i}"], bias,
                    mode | flag, group, scales)  # fmt: skip
            return y
        if x.shape[0] == 0:
            return x.new_zeros(0, self.out_features)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros
        )
        if self.planes == 1:
            y = y.float()
        else:
            n = self.out_features
            y = y[:, :n].float() + y[:, n:].float()
        return y if self.bias is None else y + self.bias

    def rows_view(self, start: int, stop: int) -> Q4Linear | None:
        """Outputs start..stop of this linear as a Q4Linear sharing its packed buffers (no copy;
        no bias), or None where that is not a view: torch's kernel, bounds not multiples of 16,
        or a range across two parts of a fused linear."""
        if self.segments is None or start % 16 or stop % 16 or not 0 <= start < stop:
            return None
        ends = [seg[0] for seg in self.segments[1:]] + [self.out_features]
        for (col, mode, group, scales, i, _), end in zip(self.segments, ends):
            if col <= start and stop <= end:
                sub = Q4Linear.__new__(Q4Linear)
                nn.Module.__init__(sub)
                sub.out_features, sub.in_features, sub.bias, sub.planes = (
                    stop - start,
                    self.in_features,
                    None,
                    0,
                )
                sub._kernel = self._kernel
                sub.a8 = self.a8
                a, b = (start - col) // 16, (stop - col) // 16
                for name in ("codes", "sa", "sb"):
                    sub.register_buffer(f"{name}0", self._buffers[f"{name}{i}"][a:b])
                sub.segments = [(0, mode, group, scales, 0, None)]
                return sub
        return None

    def row(self, t: int) -> Tensor | None:
        """Weights of output t, float32 [in], as the kernel multiplies by them (the identity
        through its block of 16 outputs, with bfloat16 activations: exact), or None where no
        view exists (see rows_view)."""
        start = t // 16 * 16
        block = self.rows_view(start, start + 16)
        if block is None:
            return None
        block.a8 = False
        return block(torch.eye(self.in_features))[:, t - start].contiguous()

    def dequantized(self) -> Tensor:
        """The float32 weights this module multiplies by (for tests and error reports)."""
        eye = torch.eye(self.in_features)
        b, self.bias = self.bias, None
        segments, a8 = self.segments, self.a8
        if segments is not None:
            self.segments = [(*seg[:-1], None) for seg in segments]
        self.a8 = False  # the identity through bfloat16 activations is exact, through bytes not
        try:
            return self.forward(eye).t().contiguous()
        finally:
            self.bias, self.segments, self.a8 = b, segments, a8

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, precision={'q4a8' if self.a8 else 'q4'}, "
            f"kernel={self.kernel}"
        )


# ---- GGUF -> native modules ----


def gguf_source(
    folder: str | Path, why: str = "precision 'q4' reads the GGUF's own blocks"
) -> Path:
    """The GGUF a model folder was made from: source.gguf, or the path veridraft.json records; a
    one-line VeridraftError (`why` it is needed, and the fix) when neither is on disk."""
    from .convert import repair_hint

    folder = Path(folder)
    if (folder / "source.gguf").is_file():
        return folder / "source.gguf"
    try:
        p = json.loads((folder / "veridraft.json").read_text()).get("source_path")
    except (OSError, ValueError):
        p = None
    if p and Path(p).is_file():
        return Path(p)
    what = f"{folder} has no source.gguf" + (f" and {p} is gone" if p else "")
    fix = repair_hint(folder)
    if not (folder / "veridraft.json").is_file():  # an HF folder: its weights serve bf16
        fix += ", or use precision='bf16'"
    raise VeridraftError(f"{why}, and {what}: {fix}")


def _parts(cfg, name: str) -> list[str]:
    """GGUF tensors a native linear is made of, in fusion order."""
    if name == "output":
        return ["token_embd.weight"] if cfg.tie_embeddings else ["output.weight"]
    _, i, sub, lin = name.split(".")
    table = {
        "wqkv": ["attn_q", "attn_k", "attn_v"],
        "wo": ["attn_output"],
        "w13": ["ffn_gate", "ffn_up"],
        "w2": ["ffn_down"],
    }
    if lin not in table:
        raise VeridraftError(f"precision 'q4' does not know the linear {name!r}")
    return [f"blk.{i}.{p}.weight" for p in table[lin]]


def _llama_rows(n: int, heads: int) -> np.ndarray:
    """Row order transformers gives a llama q/k matrix when reading a GGUF (llama.cpp stores the
    rotary halves interleaved): GGUF row index per HF row."""
    idx = np.arange(n)
    return idx.reshape(heads, -1, 2).swapaxes(1, 2).reshape(n)


def row_order(architecture: str, part: str, rows: int, heads: dict[str, int]) -> np.ndarray:
    """The GGUF row for each of the model's rows of tensor `part`: llama.cpp stores a llama
    q/k matrix with its rotary halves interleaved, and transformers (so the float32 folder)
    undoes that for the GGUF architecture "llama" only; every other matrix keeps its rows."""
    kind = part.split(".")[-2]
    if architecture == "llama" and kind in heads:
        return _llama_rows(rows, heads[kind])
    return np.arange(rows)


def apply_q4(
    model: nn.Module, gguf_path: str | Path, reference=None, a8: bool = False, fix: str = ""
) -> nn.Module:
    """Swap every linear of a float32 model for a Q4Linear built from the GGUF's blocks (in
    place). Each part is checked: a block type with a kernel, the linear's shape. A linear that
    holds float32 weights (a model built from a state dict) is also checked against them on a
    sample of rows (the de-quantized blocks, in the row order the converter chose), so a wrong
    file or layout fails loudly.
    `a8`: precision 'q4a8', the activations multiplied as signed bytes (q4kernel.a8_supported).

    models.from_folder builds q4 models with meta linears (never holding the float32 linears)
    from the GGUF alone; their rows come in `row_order`. `reference`, HF-named float32 tensors
    (from_folder passes the GGUF's own), serves a linear that must be de-quantized whole (torch's
    kernel has no Q6_K path). `fix` ends the errors about the file (how to get it again)."""
    cfg = model.config
    fix = fix or "re-pull the model"
    if a8 and not q4kernel.a8_supported():
        raise VeridraftError(
            "precision 'q4a8' needs veridraft's q4 kernel on a CPU with AVX512-VNNI and "
            "AVX512-BF16 (this one has not, or the kernel cannot be built); use precision='q4'"
        )
    gguf = read_gguf(gguf_path, fix=fix)
    tensors = gguf.tensors
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            name = next(n for n, m in model.named_modules() if m is child)
            w32 = child.weight.detach()
            parts = _parts(cfg, name)
            for part in parts:
                if part not in tensors:
                    raise VeridraftError(f"{gguf_path} lacks tensor {part!r}: {fix}")
                kind = tensors[part].kind
                if kind not in BLOCKS:
                    raise VeridraftError(
                        f"{part} in {gguf_path} is {kind}: precision 'q4' has no kernel for "
                        f"that type (it takes {', '.join(BLOCKS)}); use precision='bf16'"
                    )
            shapes = [tuple(int(x) for x in tensors[p].shape[:2]) for p in parts]
            if {c for c, _ in shapes} != {child.in_features} or sum(
                r for _, r in shapes
            ) != child.out_features:
                raise VeridraftError(
                    f"{', '.join(parts)} in {gguf_path} are {shapes} (columns, rows), the "
                    f"model's {name} is {child.out_features} x {child.in_features}: the GGUF "
                    f"does not fit config.json; {fix}"
                )
            hf_names = hf_linear_parts(cfg, name)  # the same matrices, in the same order
            kinds = {tensors[p].kind for p in parts}
            if kinds & set(KERNEL_ONLY) and q4kernel.load() is None:
                if w32.is_meta:  # bf16 mode's kernel needs the whole matrix
                    if reference is None:
                        raise ValueError(f"{name} has no weights: pass apply_q4(reference=...)")
                    w32 = torch.cat([reference[checkpoint_key(reference, k)] for k in hf_names])
                setattr(parent, cname, PackedLinear(w32, child.bias, "bf16"))
                continue
            pieces, row = [], 0
            for part in parts:
                t = tensors[part]
                kind = t.kind
                cols, rows = (int(x) for x in t.shape[:2])
                u, s, z = decode_blocks(kind, t.data, rows, cols)
                if w32.is_meta:
                    order = row_order(gguf.architecture, part, rows, heads)
                else:
                    want = lambda idx, row=row, w=w32: w[row + idx].numpy()  # noqa: E731
                    order = _match_rows(u, s, z, want, heads.get(part.split(".")[-2]))
                if order is None:
                    raise VeridraftError(
                        f"{part} in {gguf_path} does not de-quantize to the model's {name} "
                        "weights: the GGUF is not the one this model was made from"
                    )
                two = two_level(kind, t.data, rows, cols)
                two = None if two is None else tuple(a[order] for a in two)
                pieces.append((u[order], s[order], z[order], group_of(kind), two))
                row += rows
            q = Q4Linear.from_parts(pieces, child.bias)
            q.a8 = a8
            setattr(parent, cname, q)
    emb = getattr(model, "tok_embeddings", None)
    if isinstance(emb, nn.Embedding):
        emb.weight = nn.Parameter(emb.weight.detach().to(torch.bfloat16), requires_grad=False)
    model.precision = "q4a8" if a8 else "q4"
    model.rowwise_attention = True  # see Transformer.rowwise_attention
    model.cache_dtype = attnkernel.cache_dtype(torch.bfloat16)  # see Transformer.cache_dtype
    fused.attach(model)  # the C++ forward for decoding steps, where it runs (models/fused.py)
    return model


def _match_rows(u, s, z, want_rows, heads: int | None) -> np.ndarray | None:
    """The GGUF row for each of the model's rows (identity, or llama's q/k order), checked on a
    sample of rows against the float32 weights; None when neither matches."""
    rows = u.shape[0]
    orders = [np.arange(rows)]
    if heads and rows % (2 * heads) == 0:
        orders.append(_llama_rows(rows, heads))
    sample = np.unique(np.linspace(0, rows - 1, 9).astype(int))
    want = want_rows(sample)
    group = u.shape[1] // s.shape[1]
    for order in orders:
        r = order[sample]
        w = u[r].astype(np.float32) * np.repeat(s[r], group, 1) + np.repeat(z[r], group, 1)
        if np.allclose(w, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max() + 1e-30)):
            return order
    return None
