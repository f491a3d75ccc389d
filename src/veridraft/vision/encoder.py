"""The Qwen2-VL / Qwen2.5-VL vision tower in plain torch, loaded from `visual.*` tensors.

Patch rows from `veridraft.vision.processor` go through a linear patch embedding (the
checkpoint's Conv3d with kernel = stride = patch, flattened), pre-norm ViT blocks with 2-D
rotary positions over (h, w), and the merger that concatenates each 2x2 group of patches into
one LLM-sized token. Qwen2-VL uses LayerNorm, a `quick_gelu` MLP and full attention within each
frame; Qwen2.5-VL uses RMSNorm, a SiLU-gated MLP, and attention inside windows of
`window_size` pixels except in the `fullatt_block_indexes` blocks. The result equals
transformers' `model.visual(pixel_values, grid_thw).pooler_output` (one row per LLM token, in
the order the pad tokens appear in the prompt).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from veridraft.errors import VeridraftError


@dataclass
class VisionConfig:
    """The vision tower's shape. `family` is "qwen2_5_vl" or "qwen2_vl"."""

    family: str
    hidden_size: int  # ViT width (2.5-VL `hidden_size`, Qwen2-VL `embed_dim`)
    out_hidden_size: int  # merger output = LLM width (2.5-VL `out_hidden_size`, 2-VL `hidden_size`)
    intermediate_size: int
    depth: int
    num_heads: int
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 0  # pixels; 0 = no windowing (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...] = field(default_factory=tuple)
    tokens_per_second: float = 0  # 2.5-VL: M-RoPE time positions per second of video
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> VisionConfig:
        """From a `config.json` dict of a Qwen2-VL / Qwen2.5-VL model (or its `vision_config`)."""
        v = dict(config.get("vision_config", config))
        model_type = str(config.get("model_type", v.get("model_type", "")))
        rope = v.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta", 10000.0))
        if "out_hidden_size" in v or model_type.startswith("qwen2_5_vl"):
            return cls(
                family="qwen2_5_vl",
                hidden_size=v.get("hidden_size", 3584),
                out_hidden_size=v.get("out_hidden_size", 3584),
                intermediate_size=v.get("intermediate_size", 3420),
                depth=v.get("depth", 32),
                num_heads=v.get("num_heads", 16),
                hidden_act=v.get("hidden_act", "silu"),
                patch_size=v.get("patch_size", 14),
                temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2),
                in_channels=v.get("in_channels", v.get("in_chans", 3)),
                window_size=v.get("window_size", 112),
                fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
                tokens_per_second=v.get("tokens_per_second", 4),
                rope_theta=theta,
            )
        if "embed_dim" in v or model_type.startswith("qwen2_vl"):
            embed = v.get("embed_dim", 1280)
            return cls(
                family="qwen2_vl",
                hidden_size=embed,
                out_hidden_size=v.get("hidden_size", 3584),
                intermediate_size=int(embed * v.get("mlp_ratio", 4)),
                depth=v.get("depth", 32),
                num_heads=v.get("num_heads", 16),
                hidden_act=v.get("hidden_act", "quick_gelu"),
                patch_size=v.get("patch_size", 14),
                temporal_patch_size=v.get("temporal_patch_size", 2),
                spatial_merge_size=v.get("spatial_merge_size", 2),
                in_channels=v.get("in_channels", v.get("in_chans", 3)),
                rope_theta=theta,
            )
        raise VeridraftError(
            f"config of model_type {model_type!r} is not a Qwen2-VL or Qwen2.5-VL vision config; "
            "pass the config.json of one of those models"
        )


def load_vision_weights(
    state_dict: Mapping[str, torch.Tensor], config: VisionConfig
) -> dict[str, torch.Tensor]:
    """The vision tower's tensors, keyed without the `visual.` prefix.

    Accepts the checkpoint naming (`visual.blocks.0...`) and transformers 5's module naming
    (`model.visual.blocks.0...`). The Conv3d patch weight becomes a (hidden, C*T*P*P) matrix:
    with kernel = stride = patch size the convolution is one matrix product per patch row.
    """
    weights = {}
    for prefix in ("visual.", "model.visual."):
        weights = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if weights:
            break
    if not weights:
        raise VeridraftError(
            "the state dict has no visual.* tensors; pass a Qwen2-VL or Qwen2.5-VL checkpoint"
        )
    missing = [k for k in _expected_keys(config) if k not in weights]
    if missing:
        raise VeridraftError(
            f"the checkpoint lacks vision tensor {missing[0]} ({len(missing)} missing); "
            "check that the config matches the checkpoint"
        )
    weights["patch_embed.proj.weight"] = weights["patch_embed.proj.weight"].reshape(
        config.hidden_size, -1
    )
    return weights


def _expected_keys(config: VisionConfig) -> list[str]:
    keys = ["patch_embed.proj.weight", "merger.ln_q.weight"]
    keys += [f"merger.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    mlp = ("gate_proj", "up_proj", "down_proj") if config.family == "qwen2_5_vl" else ("fc1", "fc2")
    for b in range(config.depth):
        keys += [f"blocks.{b}.norm1.weight", f"blocks.{b}.norm2.weight"]
        keys += [f"blocks.{b}.attn.{m}.{p}" for m in ("qkv", "proj") for p in ("weight", "bias")]
        keys += [f"blocks.{b}.mlp.{m}.{p}" for m in mlp for p in ("weight", "bias")]
    return keys


def patch_positions(grid_thw: Sequence[Sequence[int]], merge: int) -> torch.Tensor:
    """(rows, 2) (h, w) patch coordinates in the processor's row order (2x2 merge blocks
    contiguous), repeated per frame. Matches transformers' `get_vision_position_ids`."""
    out = []
    for t, h, w in grid_thw:
        hh = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        ww = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([hh.transpose(1, 2).flatten(), ww.transpose(1, 2).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def rotary_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D RoPE tables (rows, head_dim): the first quarter of the frequencies rotate by h, the
    second by w, and the half is repeated for rotate-half pairing (as in the reference)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2))
    )
    freqs = positions[..., None].float() * inv_freq  # (rows, 2, head_dim/4)
    freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def window_order(
    config: VisionConfig, grid_thw: Sequence[Sequence[int]]
) -> tuple[torch.Tensor, list[int]]:
    """2.5-VL windows: a permutation of merged tokens that makes each window contiguous, and
    the window lengths in patch rows. Windows tile each frame's merged grid in
    `window_size / patch / merge` squares from the top-left corner (partial windows at the right
    and bottom edges). Matches transformers' `get_vision_window_index`."""
    side = config.window_size // config.spatial_merge_size // config.patch_size
    unit = config.spatial_merge_size**2
    order, lengths, base = [], [], 0
    for t, h, w in grid_thw:
        gh, gw = h // config.spatial_merge_size, w // config.spatial_merge_size
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for y in range(0, gh, side):
                for x in range(0, gw, side):
                    block = index[f, y : y + side, x : x + side].flatten()
                    order.append(block + base)
                    lengths.append(block.numel() * unit)
        base += t * gh * gw
    return torch.cat(order), lengths


def frame_lengths(grid_thw: Sequence[Sequence[int]]) -> list[int]:
    """Full attention spans one frame (temporal patch) of one item: h*w rows each."""
    return [h * w for t, h, w in grid_thw for _ in range(t)]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _norm(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, family: str) -> torch.Tensor:
    if family == "qwen2_vl":
        return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], 1e-6)
    # RMSNorm in float32, cast back before the weight (as the reference does).
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w[f"{name}.weight"] * xf.to(x.dtype)


def _attention(
    x: torch.Tensor,
    w: dict[str, torch.Tensor],
    b: int,
    heads: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    lengths: list[int],
) -> torch.Tensor:
    n = x.shape[0]
    qkv = F.linear(x, w[f"blocks.{b}.attn.qkv.weight"], w[f"blocks.{b}.attn.qkv.bias"])
    q, k, v = qkv.view(n, 3, heads, -1).unbind(1)  # (n, heads, head_dim)
    c, s = cos[:, None], sin[:, None]
    q = (q.float() * c + _rotate_half(q.float()) * s).to(x.dtype)
    k = (k.float() * c + _rotate_half(k.float()) * s).to(x.dtype)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, n, head_dim)
    # Segments (frames or windows) attend only within themselves. Runs of equal-length segments
    # are batched into one call, which keeps the many small windows of 2.5-VL cheap.
    out, start, i = [], 0, 0
    while i < len(lengths):
        j = i
        while j < len(lengths) and lengths[j] == lengths[i]:
            j += 1
        size, count = lengths[i], j - i
        end = start + size * count
        qs, ks, vs = (
            t[:, start:end].reshape(heads, count, size, -1).transpose(0, 1) for t in (q, k, v)
        )
        o = F.scaled_dot_product_attention(qs, ks, vs)  # (count, heads, size, head_dim)
        out.append(o.permute(0, 2, 1, 3).reshape(count * size, -1))
        start, i = end, j
    o = torch.cat(out)
    return F.linear(o, w[f"blocks.{b}.attn.proj.weight"], w[f"blocks.{b}.attn.proj.bias"])


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor], b: int, config: VisionConfig) -> torch.Tensor:
    p = f"blocks.{b}.mlp."
    if config.family == "qwen2_vl":
        h = _act(F.linear(x, w[p + "fc1.weight"], w[p + "fc1.bias"]), config)
        return F.linear(h, w[p + "fc2.weight"], w[p + "fc2.bias"])
    gate = _act(F.linear(x, w[p + "gate_proj.weight"], w[p + "gate_proj.bias"]), config)
    up = F.linear(x, w[p + "up_proj.weight"], w[p + "up_proj.bias"])
    return F.linear(gate * up, w[p + "down_proj.weight"], w[p + "down_proj.bias"])


def _act(x: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    # quick_gelu is transformers' QuickGELUActivation (Qwen2-VL's ViT MLP).
    acts = {
        "silu": F.silu,
        "swish": F.silu,
        "gelu": F.gelu,
        "quick_gelu": lambda h: h * torch.sigmoid(1.702 * h),
    }
    if config.hidden_act not in acts:
        raise VeridraftError(
            f"vision activation {config.hidden_act!r} is not supported; use one of {sorted(acts)}"
        )
    return acts[config.hidden_act](x)


@torch.inference_mode()
def encode(
    weights: dict[str, torch.Tensor],
    config: VisionConfig,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]] | torch.Tensor,
) -> torch.Tensor:
    """Patch rows of one or more images/videos -> (tokens, out_hidden_size) LLM embeddings.

    `pixel_values` are the concatenated rows of the items in `grid_thw` (processor order); the
    output has `t*h*w/merge**2` rows per item, concatenated in the same order.
    """
    grid = [
        tuple(int(v) for v in g)
        for g in (grid_thw.tolist() if torch.is_tensor(grid_thw) else grid_thw)
    ]
    rows = sum(t * h * w for t, h, w in grid)
    width = config.in_channels * config.temporal_patch_size * config.patch_size**2
    if pixel_values.shape != (rows, width):
        raise VeridraftError(
            f"pixel_values of shape {tuple(pixel_values.shape)} do not match grids {grid} "
            f"(expected ({rows}, {width})); pass the processor's rows and grids together"
        )
    dtype = weights["patch_embed.proj.weight"].dtype
    x = pixel_values.to(dtype) @ weights["patch_embed.proj.weight"].T
    cos, sin = rotary_cos_sin(
        patch_positions(grid, config.spatial_merge_size), config.head_dim, config.rope_theta
    )
    frames = frame_lengths(grid)
    windows, order = frames, None
    unit = config.spatial_merge_size**2
    if config.family == "qwen2_5_vl":
        # Permute whole 2x2 merge groups so every window is a contiguous run of rows.
        order, windows = window_order(config, grid)
        rows_order = (order[:, None] * unit + torch.arange(unit)).flatten()
        x, cos, sin = x[rows_order], cos[rows_order], sin[rows_order]
    for b in range(config.depth):
        windowed = config.family == "qwen2_5_vl" and b not in config.fullatt_block_indexes
        # Full-attention blocks span a frame; in window order a frame's rows are still one
        # contiguous run (windows never cross frames), so frame lengths apply unchanged.
        lengths = windows if windowed else frames
        h = _norm(x, weights, f"blocks.{b}.norm1", config.family)
        x = x + _attention(h, weights, b, config.num_heads, cos, sin, lengths)
        x = x + _mlp(_norm(x, weights, f"blocks.{b}.norm2", config.family), weights, b, config)
    x = _norm(x, weights, "merger.ln_q", config.family).reshape(-1, config.hidden_size * unit)
    x = F.linear(x, weights["merger.mlp.0.weight"], weights["merger.mlp.0.bias"])
    x = F.linear(F.gelu(x), weights["merger.mlp.2.weight"], weights["merger.mlp.2.bias"])
    if order is not None:
        x = x[torch.argsort(order)]
    return x
