"""The EAGLE-3 head for training: a new head shaped for a target, and the training-time test.

The module and its checkpoint format live with the drafter (drafters/eagle.py: drafters may not
import the tools); this adds what only training needs.

Training-time test (TTT): `steps` unrolled draft steps over every position at once. Step 0 reads
the target's features; step i > 0 reads step i - 1's output hidden state at the same position,
with the true token i positions further on, exactly as drafting feeds the head its own hidden
state. Step i at position t stands for the drafted position t + i: it attends causally to step
0's keys (the real rows of the head's cache) and to one key per earlier step at t (the drafted
rows of its own chain). Loss: per step the soft cross-entropy against the target's
distribution (its top-k probabilities, over the draft vocabulary), weighted 0.8^i.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..drafters.eagle import (
    DEFAULT_SINK,
    EagleHead,
    HeadConfig,
    default_aux_ids,
    find_head,
    load_head,
    save_head,
)

__all__ = [
    "DEFAULT_SINK",
    "EagleHead",
    "HeadConfig",
    "find_head",
    "load_head",
    "new_head",
    "save_head",
    "ttt",
]

STEP_DECAY = 0.8  # EAGLE-3's per-step loss weight


def new_head(
    net,
    draft_ids: Tensor,
    *,
    aux_ids: tuple[int, ...] | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
    meta: dict | None = None,
    fusion: str = "fc",
    num_layers: int = 1,
    window: int | None = None,
    sink: int = DEFAULT_SINK,
    anchor_offset: int = 0,
) -> EagleHead:
    """A randomly initialised head for `net` over the sorted target ids `draft_ids`; its
    lm_head starts from the target's own output rows when they are reachable (a head that
    begins by reading its hidden state as the target reads its own learns faster)."""
    from ..drafters.draft_head import head_weight

    t = net.config
    cfg = HeadConfig(
        hidden_size=t.dim,
        intermediate_size=int(intermediate_size or t.intermediate_size),
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads,
        head_dim=t.head_dim,
        vocab_size=t.vocab_size,
        draft_vocab_size=int(draft_ids.numel()),
        target_hidden_size=t.dim,
        aux_ids=tuple(aux_ids or default_aux_ids(t.n_layers)),
        rms_norm_eps=float(t.norm_eps),
        rope_theta=float(t.rope_theta),
        max_position_embeddings=int(t.max_position_embeddings),
        meta=dict(meta or {}),
        fusion=fusion,
        num_layers=int(num_layers),
        window=window,
        sink=int(sink),
        anchor_offset=int(anchor_offset),
    )
    torch.manual_seed(seed)
    head = EagleHead(cfg)
    ids = draft_ids.long()
    head.d2t.copy_(ids - torch.arange(ids.numel()))
    head.t2d.zero_()
    head.t2d[ids] = True
    w = head_weight(net)
    if w is not None and w.shape == (t.vocab_size, t.dim):
        with torch.no_grad():
            head.lm_head.weight.copy_(w[ids].float())
    return head


def target_to_draft(head: EagleHead) -> Tensor:
    """[vocab] draft id of each target id, -1 outside the draft vocabulary."""
    m = torch.full((head.config.vocab_size,), -1, dtype=torch.long)
    m[head.draft_ids] = torch.arange(head.config.draft_vocab_size)
    return m


def ttt(
    head: EagleHead,
    aux: Tensor,
    emb: Tensor,
    top_ids: Tensor,
    top_p: Tensor,
    mask: Tensor,
    steps: int,
    t2d: Tensor,
    offsets: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-time test over a batch. aux [B, T, 3D] target features; emb [B, T, D] the
    embeddings of the ids at each position; top_ids/top_p [B, T, K] the target's next-token
    top-k at each position; mask [B, T] positions whose next token counts (padding False).

    A head with a window (LongSpec) attends to step 0's keys in a band: position t sees
    positions s <= t with s > t - window or s < sink. offsets [B] (anchor offset): each sample's
    positions after the sink are shifted by its offset, so a short sample carries the large
    position numbers of a long context.

    Returns (loss, correct [steps, B, T], valid [steps, B, T]): correct = the head's top-1 is
    the target's top-1 at that step and position (the drafted token would be accepted)."""
    c = head.config
    b, t, _ = aux.shape
    hidden = head.fc(aux)
    # labels of step i at position t: the target's distribution at t + 1 + i (over draft ids)
    d_ids = t2d[top_ids]  # [B, T, K]
    in_vocab = d_ids >= 0
    p = top_p.float() * in_vocab
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-9)
    top1 = d_ids[..., 0]
    ok = mask & (top1 >= 0)

    causal = torch.ones(t, t, dtype=torch.bool).tril()
    if c.window is not None:
        r = torch.arange(t)
        causal &= (r[None] > r[:, None] - c.window) | (r[None] < c.sink)
    n_layers = c.num_layers
    # per layer: step 0's keys and values (the real rows), and one row per later step
    k0: list[Tensor] = []
    v0: list[Tensor] = []
    diag_k: list[list[Tensor]] = [[] for _ in range(n_layers)]
    diag_v: list[list[Tensor]] = [[] for _ in range(n_layers)]
    total = aux.new_zeros(())
    corrects, valids = [], []
    pos = torch.arange(t)
    if offsets is not None:  # [B, T]: the sink keeps 0 .. sink - 1
        pos = pos + (pos >= c.sink) * offsets.long()[:, None]
    rep = c.num_attention_heads // c.num_key_value_heads
    for i in range(steps):
        sh = 1 + i
        e = torch.zeros_like(emb)
        e[:, : t - sh] = emb[:, sh:]
        x, resid = head.start(hidden, e)
        for li in range(n_layers):
            if li > 0:
                x, resid = head.norm_in(li, resid), resid
            q, k, v = head.layer_qkv(li, x, pos + i)
            if i == 0:
                k0.append(k)
                v0.append(v)
            else:
                diag_k[li].append(k)
                diag_v[li].append(v)
            kr = k0[li].repeat_interleave(rep, 2)
            vr = v0[li].repeat_interleave(rep, 2)
            s = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(c.head_dim)
            s = s.masked_fill(~causal, float("-inf"))
            extra = [(q * dk.repeat_interleave(rep, 2)).sum(-1) for dk in diag_k[li]]
            if extra:  # [B, T, H] per earlier step
                d = torch.stack(extra, -1).permute(0, 2, 1, 3) / math.sqrt(c.head_dim)
                s = torch.cat((s, d), -1)
            a = torch.softmax(s, -1)
            out = torch.einsum("bhts,bshd->bthd", a[..., :t], vr)
            for j, dv in enumerate(diag_v[li]):
                w = a[..., t + j].permute(0, 2, 1)[..., None]
                out = out + w * dv.repeat_interleave(rep, 2)
            resid = head.layer_finish(li, resid, out)
        hidden = resid
        lab_p = torch.zeros_like(p)
        lab_i = torch.zeros_like(d_ids)
        valid = torch.zeros_like(ok)
        lab_p[:, : t - sh] = p[:, sh:]
        lab_i[:, : t - sh] = d_ids[:, sh:].clamp_min(0)
        valid[:, : t - sh] = ok[:, sh:]
        # the draft-vocabulary logits only where the loss counts: a chat sample's prompt rows
        # (most of its rows) need keys, not logits, and the logits are the costliest matmul
        logq = F.log_softmax(head.logits(hidden[valid]), -1)  # [N, Vd]
        ce = -(lab_p[valid] * logq.gather(-1, lab_i[valid])).sum(-1)
        n = valid.sum().clamp_min(1)
        total = total + (STEP_DECAY**i) * ce.sum() / n
        top = torch.zeros_like(top1)
        top[:, : t - sh] = top1[:, sh:]
        correct = torch.zeros_like(valid)
        correct[valid] = logq.argmax(-1) == top[valid]
        corrects.append(correct)
        valids.append(valid)
    return total, torch.stack(corrects), torch.stack(valids)


def acceptance(correct: Tensor, valid: Tensor) -> tuple[float, float]:
    """(top-1 acceptance of the first draft token, expected tokens per round of a chain of
    `steps` drafts: 1 + the mean run of leading correct steps), over positions where every
    step has a label."""
    all_valid = valid.all(0)
    if not bool(all_valid.any()):
        return 0.0, 1.0
    run = correct.long().cumprod(0).sum(0)  # leading correct steps per position
    alpha = float(correct[0][valid[0]].float().mean()) if bool(valid[0].any()) else 0.0
    return alpha, 1.0 + float(run[all_valid].float().mean())
