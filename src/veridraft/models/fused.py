"""The fused forward (fused.cpp): every layer of a q4 / q4a8 model in one C++ call.

A one-token step of a small model is mostly dispatch: ~3,700 ATen calls per step for
smollm2-135m in q4, each with its interpreter and dispatcher overhead around a few microseconds of
arithmetic. `attach` gives such a model a C++ forward that runs the same layer body (norms,
the q4 matmuls, RoPE, the cache write, the decode attention kernel, the gated activation,
residuals) with no Python between the kernels, for every forward of up to 64 rows: decoding,
verification, token trees, sparse views and sub-layer skips, on a plain cache or on a compacted
one (presses/compact.py) whose layers all keep one count of prompt rows per KV head. Longer
forwards (prefill), those that capture attention and those on other compacted layouts keep the
Python path; the elementwise steps of both are the same C++ loops (`rmsnorm`, `rope`, `glu`),
so the two paths agree bit for bit and mix freely.

Built like veridraft's other kernels (models/kernels.py), on CPUs with AVX512-BF16, where q4's
and the attention's kernels run; ``VERIDRAFT_FUSED=0`` keeps the Python path (for comparisons).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import Tensor, nn

from . import attnkernel, kernels, q4kernel
from .attention import Step, kernel_keys
from .base import Attention, GatedMLP, RMSNorm
from .plan import ForwardPlan

SOURCE = Path(__file__).with_name("fused.cpp")
DEPS = (q4kernel.SOURCE, attnkernel.SOURCE)
ACTS = {"llama": 0, "gemma3": 1}  # the gated activation fused.cpp runs: SiLU, GELU (tanh)
_loaded: dict[str, object] = {}


def enabled() -> bool:
    """False when VERIDRAFT_FUSED=0 (or "off", "false") asks for the Python path."""
    return os.environ.get("VERIDRAFT_FUSED", "").strip().lower() not in ("0", "off", "false", "no")


def load() -> object | None:
    """The compiled module, or None: switched off, a CPU without AVX512-BF16, the q4 or attention
    kernel unavailable, or a failed build (which warns once)."""
    if "module" in _loaded:
        return _loaded["module"]
    module = None
    if enabled() and kernels.isa() == "avx512bf16" and attnkernel.load() and q4kernel.load():
        try:
            module = kernels.build(
                "fused", SOURCE, kernels.FLAGS, "the fused q4 forward", deps=DEPS
            )
        except Exception as e:  # the Python path still works, slower
            warnings.warn(
                "q4 mode keeps its Python layers: building the fused forward failed "
                f"({str(e).strip().splitlines()[-1][:200]})",
                stacklevel=2,
            )
    _loaded["module"] = module
    return module


def _segments(lin) -> list[tuple] | None:
    """The kernel calls of a Q4Linear as fused.cpp takes them, or None when it runs another
    kernel."""
    if getattr(lin, "segments", None) is None:
        return None
    flag = q4kernel.A8 if lin.a8 else 0
    buf = dict(lin.named_buffers(recurse=False))
    return [
        (col, mode | flag, group, scales, buf[f"codes{i}"], buf[f"sa{i}"], buf[f"sb{i}"], bias)
        for col, mode, group, scales, i, bias in lin.segments
    ]


def _norms(block) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """(before attention, after it, before the MLP, after it) of a Llama or Gemma 3 block."""
    if hasattr(block, "attention_norm"):  # llama.Block
        return block.attention_norm.weight, None, block.ffn_norm.weight, None
    return (
        block.input_norm.weight,
        block.post_attention_norm.weight,
        block.pre_ffn_norm.weight,
        block.post_ffn_norm.weight,
    )


class FusedForward:
    """A model's C++ forward; which forwards it takes is the forward plan's choice
    (plan.plan_forward, `ForwardPlan.fused`)."""

    def __init__(self, net, n_layers: int, head_dim: int) -> None:
        self.net, self.n_layers, self.head_dim = net, n_layers, head_dim

    def run(
        self,
        x: Tensor,
        step: Step,
        plan: ForwardPlan,
        mlp: list[bool],
        n: int,
        want_hidden: bool,
        keep: tuple[int, ...] = (),
    ):
        """Every layer of a forward the plan gave to this path (plan_forward decides which:
        up to 64 rows, the decode kernel on every attention layer, no attention to capture);
        returns the logits of the last n rows, if asked the final normed hidden states, and
        {layer: its output} for the sorted layer indices in `keep`."""
        cache, t, view = step.cache, step.t, plan.fused_view
        lo, hi, ext = [], [], []
        for span in plan.groups:  # the key ranges once per distinct span, not per layer
            a, b, e = kernel_keys(step, span) if view is None else view[1](step, span)
            lo.append(a), hi.append(b), ext.append(e)
        if lo:
            cache.note_write(step.start)
        kc, vc, start = cache.k, cache.v, step.start
        if view is not None:  # the compacted layout: the rows of position p sit at p + shift
            shift, _, plain = view
            kc, vc, start = plain.k, plain.v, start + shift
        cos = [c.reshape(t, -1) for c, _ in step.rope]
        sin = [s.reshape(t, -1) for _, s in step.rope]
        logits, hidden, *kept = self.net.forward(
            x, kc, vc, start, cos, sin, lo, hi, ext, plan.group_of, mlp, n, want_hidden, list(keep)
        )
        return logits, (hidden if want_hidden else None), dict(zip(keep, kept))


def attach(model: nn.Module) -> bool:
    """Give a q4 / q4a8 model (Llama family or Gemma 3, every linear on veridraft's q4 kernel)
    the fused forward and the shared elementwise steps; False (the model unchanged) where the
    module cannot be loaded or the model is not of that kind."""
    ext = load()
    cfg = model.config
    if ext is None or cfg.arch not in ACTS:
        return False
    head = _segments(model.output)
    if head is None:
        return False
    net = ext.Net(
        cfg.dim,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.intermediate_size,
        cfg.norm_eps,
        ACTS[cfg.arch],
    )
    for block in model.layers:
        att, mlp = block.attention, block.feed_forward
        lins = [_segments(m) for m in (att.wqkv, att.wo, mlp.w13, mlp.w2)]
        if any(s is None for s in lins):
            return False
        qk = None if att.qk_weight is None else att.qk_weight.detach().reshape(-1).contiguous()
        net.add_layer(*_norms(block), qk, *lins, att.rope_index, att.scale, att.softcap or 0.0)
    net.set_head(model.norm.weight, head, cfg.vocab_size)
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, GatedMLP)):
            m.kernel = ext
        if isinstance(m, GatedMLP):
            m.act_id = ACTS[cfg.arch]
    model.fused = FusedForward(net, cfg.n_layers, cfg.head_dim)
    return True


def detach(model: nn.Module) -> None:
    """Back to torch's ops and the Python layers (what VERIDRAFT_FUSED=0 gives at load)."""
    model.fused = None
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, GatedMLP)):
            m.kernel = None


def uses_fused(model: nn.Module) -> bool:
    return getattr(model, "fused", None) is not None
