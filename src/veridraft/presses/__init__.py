"""KV-cache compression policies ("presses"), all lossy: which prompt positions each layer and
KV head keeps after prefill. One file per policy; the result is a CompactKVCache that really is
smaller (compact.py).

    press = make_press("snapkv:budget=1024")     # tokens per KV head
    press = make_press("adakv:budget=0.25")      # a ratio of the prompt
    pre = prefill_compressed(net, prompt_ids, max_len, press)   # a decode.Prefill

Spec grammar (veridraft.spec, as drafters): ``NAME:KEY=VALUE[,KEY=VALUE...]``; every press takes
`budget`. A press's parameters are its dataclass fields named in `params` (their types and
defaults are the fields').
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..cache import KVCache
from ..decode import PREFILL_CHUNK, Prefill, run_prompt
from ..errors import VeridraftError
from ..models.base import Capture
from ..spec import Registry
from .base import Press
from .compact import CompactKVCache

PRESSES = Registry(
    "kv press",
    {
        "streaming": ".streaming:StreamingPress",
        "snapkv": ".snapkv:SnapKVPress",
        "pyramidkv": ".pyramidkv:PyramidKVPress",
        "adakv": ".adakv:AdaKVPress",
        "h2o": ".h2o:H2OPress",
        "mm-shiftkv": ".mmshiftkv:MMShiftKVPress",
        "hybridkv": ".hybridkv:HybridKVPress",
    },
    package=__name__,
)

__all__ = [
    "PRESSES",
    "CompactKVCache",
    "Press",
    "full_kv_bytes",
    "make_press",
    "memory_note",
    "prefill_capture",
    "prefill_compressed",
]


def press_class(name: str) -> type[Press]:
    return PRESSES[name]


def make_press(spec: str | Press) -> Press:
    """A press from a spec such as "snapkv:budget=1024" (or a Press: itself)."""
    if isinstance(spec, Press):
        return spec
    entry, params = PRESSES.resolve(PRESSES.parse(spec))
    return entry.target.from_params(params)


@torch.no_grad()  # not inference_mode: the compacted cache must accept writes outside it
def prefill_compressed(net, prompt_ids: Sequence[int], max_len: int, press: Press) -> Prefill:
    """Prefill the prompt on a full cache (reading the attention the press needs), compress it,
    and return a Prefill on the compacted cache with room for max_len - len(prompt) tokens.

    The prompt runs as plain decoding's prefill does (decode.run_prompt: chunks of
    PREFILL_CHUNK positions, attended in tiles), so the full cache, and every row the press
    keeps of it, is bitwise plain decoding's in every precision mode; the attention statistics
    are a separate float32 product that each chunk adds to (models.base.capture_press_attention).
    """
    ids = [int(i) for i in prompt_ids]
    if any(w is not None for w in getattr(net, "windows", [])):
        raise VeridraftError(
            "kv compression needs a model without sliding-window layers (this one has them); "
            "use a Llama / Qwen model or drop kv="
        )
    full, cap, logits = prefill_capture(net, ids, len(ids), press.capture())
    cache = press.compress(net, full, cap, room=max_len - len(ids))
    return Prefill(ids=ids, cache=cache, logits=logits.clone())


def prefill_capture(
    net, ids: list[int], max_len: int, cap: Capture | None, chunk: int | None = PREFILL_CHUNK
) -> tuple[KVCache, Capture | None, torch.Tensor]:
    """The prompt on a new full cache of max_len positions, in plain decoding's chunks, with
    the press statistics `cap` asks for over the whole prompt: (cache, cap, last logits [V])."""
    full = net.new_cache(max_len)
    if cap is not None:
        cap.press_len = len(ids)
    return full, cap, run_prompt(net, ids, full, chunk, capture=cap)


def full_kv_bytes(net, positions: int) -> int:
    """Bytes of a full KV cache holding `positions` positions, in the model's cache element type
    (float32, or bfloat16 where the packed modes keep it so)."""
    c = net.config
    size = torch.empty(0, dtype=getattr(net, "cache_dtype", torch.float32)).element_size()
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * positions * size


def memory_note(cache: CompactKVCache, net, press: Press) -> str:
    """The --stats line of a compressed generation (lossy)."""
    c = net.config
    rows = cache.kept_rows()
    per_head = rows / (c.n_layers * c.n_kv_heads)
    held, full = cache.nbytes(), full_kv_bytes(net, cache.max_len)
    tier = cache.tier_bytes()
    more = f", slow tier {tier / 2**20:.1f} MB memory-mapped" if tier else ""
    return (
        f"kv {press.spec()} (lossy KV compression): kept {per_head:.0f} of {cache.base} prompt "
        f"positions per KV head on average; KV memory held {held / 2**20:.1f} MB vs "
        f"{full / 2**20:.1f} MB full (/{full / max(held, 1):.1f}){more}"
    )
