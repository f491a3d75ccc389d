"""M-RoPE position ids for Qwen2-VL / Qwen2.5-VL prompts (three streams: t, h, w).

Text tokens get the same running index on all three streams (plain RoPE). A run of image or
video pad tokens gets, per merged patch, `(t, h, w)` offsets on top of the position where the
run starts: `h` and `w` are the merged-grid row and column, `t` is the temporal patch index
(Qwen2-VL, and images in both) or, for Qwen2.5-VL videos, absolute time
`int(index * second_per_grid * tokens_per_second)`. Text after a run resumes at the largest
position used so far + 1, so a 448x448 image advances positions by 16, not by its 256 tokens.

During decoding, token `n` of the sequence (n >= prompt length) has position `n + delta` on all
three streams, with `delta = max(prompt positions) + 1 - prompt length` (transformers'
`rope_deltas`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from veridraft.errors import VeridraftError


def vision_positions(
    start: int,
    grid_thw: Sequence[int],
    merge: int = 2,
    time_interval: float | None = None,
) -> torch.Tensor:
    """(3, t*h*w/merge**2) positions of one image or video starting at `start`.

    `time_interval` is `tokens_per_second * second_per_grid` for Qwen2.5-VL videos (temporal
    position `int(i * interval)`, computed in float32 as the reference does); None keeps `t = i`.
    Matches `get_vision_position_ids` of transformers' Qwen2-VL / Qwen2.5-VL models.
    """
    t, h, w = (int(v) for v in grid_thw)
    gh, gw = h // merge, w // merge
    tt = torch.arange(t)
    if time_interval is not None:
        tt = (tt * torch.tensor(time_interval, dtype=torch.float32)).long()
    pos = torch.stack(
        [
            tt.view(t, 1, 1).expand(t, gh, gw),
            torch.arange(gh).view(1, gh, 1).expand(t, gh, gw),
            torch.arange(gw).view(1, 1, gw).expand(t, gh, gw),
        ]
    )
    return pos.reshape(3, -1) + start


def rope_index(
    input_ids: Sequence[int] | torch.Tensor,
    image_grid_thw: Sequence[Sequence[int]] | torch.Tensor | None = None,
    video_grid_thw: Sequence[Sequence[int]] | torch.Tensor | None = None,
    second_per_grid_ts: Sequence[float] | torch.Tensor | None = None,
    *,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    spatial_merge_size: int = 2,
    tokens_per_second: float | None = None,
    text_after_vision: str = "max",
) -> tuple[torch.Tensor, int]:
    """(3, L) M-RoPE positions of one prompt and its `rope_delta`.

    `tokens_per_second` None means Qwen2-VL (video time = temporal patch index); a number means
    Qwen2.5-VL (video time scaled by `second_per_grid_ts`, default 1.0 per video). Images and
    videos are taken in order from their grids, each covering `t*h*w/merge**2` pad tokens.

    `text_after_vision` picks where text resumes after an image or video: "max" (the largest
    position of the block + 1, as the released models' reference code and transformers 4.x
    compute it) or "spatial" (start + max(h, w)/merge, transformers 5.x). They differ only for
    videos whose temporal positions outrun their spatial extent.
    Matches `Qwen2VLModel.get_rope_index` / `Qwen2_5_VLModel.get_rope_index` for one sequence
    without padding.
    """
    if text_after_vision not in ("max", "spatial"):
        raise VeridraftError(
            f"text_after_vision={text_after_vision!r} is not a rule; use 'max' or 'spatial'"
        )
    ids = input_ids.tolist() if torch.is_tensor(input_ids) else list(input_ids)
    grids = {
        image_token_id: _rows(image_grid_thw),
        video_token_id: _rows(video_grid_thw),
    }
    seconds = [float(s) for s in _flat(second_per_grid_ts)]
    used = {image_token_id: 0, video_token_id: 0}
    blocks, pos, i = [], 0, 0
    while i < len(ids):
        tok = ids[i]
        if tok not in grids:
            j = i
            while j < len(ids) and ids[j] not in grids:
                j += 1
            blocks.append(torch.arange(pos, pos + j - i).expand(3, -1))
            pos, i = pos + j - i, j
            continue
        kind = "image" if tok == image_token_id else "video"
        n = used[tok]
        if n >= len(grids[tok]):
            raise VeridraftError(
                f"the prompt has more {kind} pad runs than {kind} grids ({len(grids[tok])}); "
                f"pass one {kind}_grid_thw row per {kind}"
            )
        grid = grids[tok][n]
        used[tok] += 1
        count = grid[0] * grid[1] * grid[2] // spatial_merge_size**2
        if ids[i : i + count] != [tok] * count:
            raise VeridraftError(
                f"{kind} {n} needs {count} consecutive pad tokens for grid {tuple(grid)}; "
                "expand the pads with the processor's token counts"
            )
        interval = None
        if kind == "video" and tokens_per_second is not None:
            spg = seconds[n] if n < len(seconds) else 1.0
            # float32, in the reference's order: tokens_per_second * second_per_grid.
            interval = (torch.tensor(spg, dtype=torch.float32) * tokens_per_second).item()
        block = vision_positions(pos, grid, spatial_merge_size, interval)
        blocks.append(block)
        if text_after_vision == "max":
            pos = int(block.max()) + 1
        else:
            pos += max(grid[1], grid[2]) // spatial_merge_size
        i += count
    for tok, rows in grids.items():
        if used[tok] != len(rows):
            kind = "image" if tok == image_token_id else "video"
            raise VeridraftError(
                f"{len(rows)} {kind} grids were given but the prompt has {used[tok]} {kind} "
                "pad runs; pass one grid per image or video in the prompt"
            )
    positions = torch.cat(blocks, dim=1) if blocks else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, section: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) of M-RoPE for (3, L) positions, in the half-split (rotate_half)
    layout: frequency pair j rotates by the t position for j < section[0], by h for the next
    section[1] pairs and by w for the last section[2] (sum(section) = head_dim / 2).

    Matches the rotary embedding of transformers' Qwen2-VL / Qwen2.5-VL text model. When the
    three streams are equal (text) the result is plain RoPE at that position.
    """
    if sum(section) != head_dim // 2:
        raise VeridraftError(
            f"mrope_section {list(section)} sums to {sum(section)}, not head_dim/2 = "
            f"{head_dim // 2}; use the model's rope_parameters.mrope_section"
        )
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    stream = torch.repeat_interleave(torch.arange(3), torch.tensor(list(section)))
    # Each pair's angle uses its own stream's position; float32 as the reference computes it.
    angles = positions[stream].T.float() * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def decode_positions(start: int, count: int, delta: int) -> torch.Tensor:
    """(3, count) positions of tokens start..start+count-1 after the prompt: `n + delta` on all
    three streams (what the reference does from the cached `rope_deltas`)."""
    return (torch.arange(start, start + count) + delta).expand(3, -1)


def _rows(grid: Sequence[Sequence[int]] | torch.Tensor | None) -> list[list[int]]:
    if grid is None:
        return []
    rows = grid.tolist() if torch.is_tensor(grid) else [list(g) for g in grid]
    return [[int(v) for v in r] for r in rows]


def _flat(values: Sequence[float] | torch.Tensor | None) -> list[float]:
    if values is None:
        return []
    return values.flatten().tolist() if torch.is_tensor(values) else list(values)
