"""The forward plan: which path every layer of one forward takes, decided once, here.

Losslessness rests on this choice. Speculative decoding is bitwise plain decoding only when a
verification forward's rows are what one-token forwards at their positions compute: the decode
kernel (KERNEL) and the row-wise torch paths (ROWS, TREE_ROWS) give that by construction; the
batched paths (TILED, MASKED) only in fp32, where nothing is row-exact anyway. `plan_forward`
makes the choice for the Python layers (models/attention.py `attend`), for a compacted cache
(presses/compact.py reads the same paths) and for the fused C++ forward (models/fused.py), in
one pass over the layers; tests/models/test_plan.py pins it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..cache import KVCache
from ..errors import VeridraftError
from ..tree import TreeAttn
from . import attnkernel
from .attention import (
    KERNEL,
    MASKED,
    PROMPT_ROWS,
    ROWS,
    ROWWISE_MAX_T,
    TILED,
    TREE_ROWS,
    Capture,
    Span,
    decode_kernel,
    make_span,
    make_tree_span,
)


@dataclass(frozen=True)
class Skip:
    """Sub-layers to bypass: the residual passes through, a skipped attention writes no KV."""

    attn: frozenset[int] = frozenset()
    mlp: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "attn", frozenset(self.attn))
        object.__setattr__(self, "mlp", frozenset(self.mlp))


@dataclass
class ForwardPlan:
    """One forward's decisions: per layer its span and attention path (None: skipped), and
    whether the fused C++ forward takes the whole forward."""

    spans: list[Span | None]
    paths: list[str | None]
    # the distinct spans in first-use order (layers of one window and view share one) and, per
    # layer, its index among them (-1: attention skipped): the fused forward's key tables
    groups: list[Span] = field(default_factory=list)
    group_of: list[int] = field(default_factory=list)
    fused: bool = False
    # on a compacted cache taken by the fused forward: its plain layout (CompactKVCache.fused_view)
    fused_view: tuple | None = None


def layer_path(
    t: int,
    span: Span,
    *,
    kernel: bool,
    tree: bool = False,
    rowwise: bool = False,
    compacted: bool = False,
    prompt_kernel: bool = False,
) -> str:
    """The attention path of one layer's T rows over `span`.

    kernel: the decode kernel runs on this layer's cache (attention.decode_kernel); rowwise:
    the model's packed modes ask for row-exact attention (Transformer.rowwise_attention);
    prompt_kernel: the kernel also takes long forwards on this cache's element type
    (attnkernel.for_prompts); compacted: the cache is a CompactKVCache, which attends over its
    own layout along the same paths (KERNEL, ROWS or MASKED)."""
    short = t <= ROWWISE_MAX_T  # decoding and verification; longer forwards are prefills
    if compacted:
        if short and kernel:
            return KERNEL
        return ROWS if short and rowwise else MASKED
    view = span.index is not None
    if short and kernel:
        return KERNEL
    if rowwise and 1 < t and short and not view:
        return TREE_ROWS if tree else ROWS
    if not view and span.causal:
        return PROMPT_ROWS if not short and prompt_kernel and kernel else TILED
    return MASKED


def plan_forward(
    cache: KVCache,
    start: int,
    t: int,
    windows: list[int | None],
    head_dim: int,
    *,
    skip: Skip | None = None,
    view: Tensor | dict[int, Tensor] | None = None,
    tree: TreeAttn | None = None,
    capture: Capture | None = None,
    rowwise: bool = False,
    fused: bool = False,
) -> ForwardPlan:
    """Decide a forward of T rows at positions start.. : each layer's keys and path, and
    whether the fused forward (`fused`: the model has one) takes it all. One pass over the
    layers; layers with the same window (and view) share one span and one set of key ranges.

    The fused forward takes up to ROWWISE_MAX_T rows with the decode kernel on every attention
    layer, no attention to capture and hidden states asked only of the final norm (a drafter's
    own head); on a compacted cache, only a layout with one count of kept rows per KV head."""
    if tree is not None and (view is not None or tree.mask.shape[0] != t):
        raise VeridraftError(
            "a tree forward takes one row per tree node plus the root, and no view"
        )
    skip_attn = skip.attn if skip is not None else frozenset()
    compacted = hasattr(cache, "attend")
    n_layers = len(windows)
    want = set(capture.hidden_layers) if capture is not None else set()
    attn_capture = capture is not None and (capture.attn_rows > 0 or capture.press_rows > 0)
    fused = (
        fused
        and 1 <= t <= ROWWISE_MAX_T
        and not attn_capture
        # the fused forward hands back the final hidden states and any layer's output
        and want <= {-1, n_layers} | set(range(n_layers))
    )
    fused_view = None
    if fused and compacted:  # a compacted cache runs fused only as a shifted plain cache
        fused_view = cache.fused_view(start) if hasattr(cache, "fused_view") else None
        fused = fused_view is not None

    spans: list[Span | None] = []
    paths: list[str | None] = []
    groups: list[Span] = []
    group_of: list[int] = []
    shared: dict = {}  # (window, id(view)) -> index into groups
    for i, w in enumerate(windows):
        if i in skip_attn:
            spans.append(None), paths.append(None), group_of.append(-1)
            continue
        v = view.get(i) if isinstance(view, dict) else view
        # layers given the same view tensor share its span (one check, one mask)
        key = (w, None if v is None else id(v))
        j = shared.get(key)
        if j is None:
            if tree is not None:
                span = make_tree_span(start, tree, w)
            else:
                span = make_span(start, t, w, v)
            if compacted and (span.index is not None or span.window is not None):
                raise VeridraftError(
                    "a compacted KV cache takes no view= and no sliding-window layer; use a "
                    "drafter without a sparse view, or a model without sliding-window attention"
                )
            j = shared[key] = len(groups)
            groups.append(span)
        span = groups[j]
        kernel = decode_kernel(cache, i, head_dim)
        fused = fused and kernel
        # asked only where it can matter: a long contiguous forward (it reads the environment)
        prompt = t > ROWWISE_MAX_T and span.causal and attnkernel.for_prompts(cache.k[i].dtype)
        path = layer_path(
            t,
            span,
            kernel=kernel,
            tree=tree is not None,
            rowwise=rowwise,
            compacted=compacted,
            prompt_kernel=prompt,
        )
        spans.append(span), paths.append(path), group_of.append(j)
    return ForwardPlan(spans, paths, groups, group_of, fused, fused_view if fused else None)
