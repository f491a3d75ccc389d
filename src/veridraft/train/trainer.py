"""Train an EAGLE-3 head on stored features (features.py) with the training-time test.

The draft vocabulary is the `draft_vocab` target tokens most often predicted by the target over
the training samples (EAGLE-3's frequency rule); the held-back slice (the last samples) gives
the top-1 acceptance of the first draft token and the expected tokens per round of a chain
after every epoch.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import VeridraftError
from .features import Sample
from .head import DEFAULT_SINK, EagleHead, acceptance, new_head, target_to_draft, ttt


@dataclass
class TrainConfig:
    steps: int = 3  # unrolled TTT steps
    epochs: int = 1
    minutes: float | None = None
    lr: float = 1e-3
    batch: int = 4
    holdout: float = 0.1
    draft_vocab: int = 8192
    intermediate_size: int | None = None
    clip: float = 0.5
    seed: int = 0
    # matmuls in bfloat16 (weights, optimiser and loss stay float32): ~1.3x faster training on
    # a CPU with AVX512-BF16 (measured, AMD EPYC Zen 4), much slower on one without
    bf16: bool = False
    freeze_lm_head: bool = False  # keep the target's own output rows (less to learn)
    fusion: str = "fc"  # "gated": Dovetail's gating fusion of the feature and the embedding
    layers: int = 1  # decoder layers of the head
    # LongSpec: step 0 attends to the sink and the last `window` positions (None: all), and
    # each sample's positions after the sink shift by a random 0 .. anchor_offset
    window: int | None = None
    sink: int = DEFAULT_SINK
    anchor_offset: int = 0


@dataclass
class Report:
    losses: list[float] = field(default_factory=list)  # mean training loss per epoch
    held: list[tuple[float, float, float]] = field(default_factory=list)  # (loss, alpha, tau)
    seconds: float = 0.0
    tokens: int = 0
    steps: int = 0


def draft_vocab(samples: list[Sample], n: int, vocab: int) -> torch.Tensor:
    """The n target ids most often the target's top-1 (then the next ranks), sorted."""
    counts: Counter = Counter()
    for s in samples:
        counts.update(s.top_ids[s.mask, 0].tolist())
    ids = [t for t, _ in counts.most_common(n)]
    if len(ids) < n:  # fill with the lowest ids not taken (frequent pieces in BPE tables)
        taken = set(ids)
        ids += [t for t in range(vocab) if t not in taken][: n - len(ids)]
    return torch.tensor(sorted(ids), dtype=torch.long)


def _batch(net, samples: list[Sample]):
    t = max(int(s.ids.numel()) for s in samples)
    b = len(samples)
    d3 = samples[0].aux.shape[1]
    k = samples[0].top_ids.shape[1]
    aux = torch.zeros(b, t, d3)
    ids = torch.zeros(b, t, dtype=torch.long)
    top_ids = torch.zeros(b, t, k, dtype=torch.long)
    top_p = torch.zeros(b, t, k)
    mask = torch.zeros(b, t, dtype=torch.bool)
    for i, s in enumerate(samples):
        n = int(s.ids.numel())
        aux[i, :n] = s.aux.float()
        ids[i, :n] = s.ids.long()
        top_ids[i, :n] = s.top_ids.long()
        top_p[i, :n] = s.top_p.float()
        mask[i, :n] = s.mask
    with torch.no_grad():
        emb = net.embed(ids.reshape(-1)).float().reshape(b, t, -1)
    return aux, emb, top_ids, top_p, mask


def evaluate(
    head: EagleHead, net, samples: list[Sample], steps: int, batch: int, bf16: bool = False
):
    """(loss, alpha, tau) of the head over samples."""
    t2d = target_to_draft(head)
    losses, cs, vs = [], [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for a in range(0, len(samples), batch):
            aux, emb, ti, tp, m = _batch(net, samples[a : a + batch])
            loss, c, v = ttt(head, aux, emb, ti, tp, m, steps, t2d)
            losses.append(float(loss))
            cs.append(c.flatten(1))
            vs.append(v.flatten(1))
    alpha, tau = acceptance(torch.cat(cs, 1), torch.cat(vs, 1))
    return sum(losses) / max(1, len(losses)), alpha, tau


CHECKPOINT_SECONDS = 300.0  # what a stopped training run may lose


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # whole or absent: a stop while saving keeps the previous one


def train(
    net,
    samples: list[Sample],
    cfg: TrainConfig,
    *,
    aux_ids: tuple[int, ...],
    head: EagleHead | None = None,
    meta: dict | None = None,
    log=print,
    checkpoint: Path | None = None,
    progress: bool = False,
) -> tuple[EagleHead, Report]:
    """Train a head (a new one unless given) on samples; returns it and the report.

    With `checkpoint`, the head, the optimiser and the place in the epoch are saved there every
    few minutes and after every epoch, and a run with the same samples and settings continues
    from it (the file is removed by the caller once the head is written)."""
    from tqdm import tqdm

    if len(samples) < 2:
        raise VeridraftError(
            f"{len(samples)} feature samples: too few to train and hold back a slice; raise "
            "--max-tokens or give a larger --corpus"
        )
    n_held = max(1, int(round(len(samples) * cfg.holdout)))
    train_s, held = samples[:-n_held], samples[-n_held:]
    # the budget (minutes) may change between a run and its continuation; nothing else may
    settings = {k: v for k, v in asdict(cfg).items() if k != "minutes"}
    key = {"config": settings, "samples": len(samples), "tokens": _tokens(samples)}
    state = None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        if state.get("key") != key:
            log(f"training: {checkpoint} was made with other settings or features; starting anew")
            state = None
    if state is not None:
        head = EagleHead(state["head_config"])
        head.load_state_dict(state["head"])
    elif head is None:
        vocab = draft_vocab(
            train_s, min(cfg.draft_vocab, net.config.vocab_size), net.config.vocab_size
        )
        head = new_head(
            net,
            vocab,
            aux_ids=aux_ids,
            intermediate_size=cfg.intermediate_size,
            seed=cfg.seed,
            meta=meta,
            fusion=cfg.fusion,
            num_layers=cfg.layers,
            window=cfg.window,
            sink=cfg.sink,
            anchor_offset=cfg.anchor_offset,
        )
    head.train()
    head.requires_grad_(True)
    if cfg.freeze_lm_head:
        head.lm_head.requires_grad_(False)
    t2d = target_to_draft(head)
    opt = torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95)
    )
    rep = Report()
    rng = random.Random(cfg.seed)
    per_epoch = (len(train_s) + cfg.batch - 1) // cfg.batch
    total_steps = cfg.epochs * per_epoch
    start_epoch, start_batch = 0, 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        rep = state["report"]
        rng.setstate(state["rng"])
        start_epoch, start_batch = state["epoch"], state["batch"]
        log(f"training: continuing from {checkpoint} (step {rep.steps} of {total_steps})")
    t0 = time.perf_counter() - rep.seconds
    deadline = time.perf_counter() + 60 * cfg.minutes if cfg.minutes else None
    warm = max(1, total_steps // 20)
    out_of_time = False
    last_save = time.perf_counter()
    bar = tqdm(
        total=total_steps,
        initial=rep.steps,
        unit="step",
        desc="training",
        disable=not progress,
        dynamic_ncols=True,
    )

    def save(epoch: int, batch: int, order_state) -> None:
        if checkpoint is None:
            return
        rep.seconds = time.perf_counter() - t0
        _save_checkpoint(
            checkpoint,
            {
                "key": key,
                "head_config": head.config,
                "head": head.state_dict(),
                "opt": opt.state_dict(),
                "report": rep,
                "rng": order_state,
                "epoch": epoch,
                "batch": batch,
            },
        )

    for epoch in range(start_epoch, cfg.epochs):
        rng_at_start = rng.getstate()  # the epoch's order is rebuilt from it on resume
        order = list(range(len(train_s)))
        rng.shuffle(order)
        ep_loss, ep_n = 0.0, 0
        first = start_batch if epoch == start_epoch else 0
        for bi in range(first, per_epoch):
            part = [train_s[j] for j in order[bi * cfg.batch : (bi + 1) * cfg.batch]]
            aux, emb, ti, tp, m = _batch(net, part)
            offsets = _offsets(cfg, len(part), rep.steps)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss, _, _ = ttt(head, aux, emb, ti, tp, m, cfg.steps, t2d, offsets)
            lr = cfg.lr * min(1.0, (rep.steps + 1) / warm)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.clip)
            opt.step()
            rep.steps += 1
            rep.tokens += int(m.sum())
            ep_loss += float(loss.detach())
            ep_n += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
            if time.perf_counter() - last_save > CHECKPOINT_SECONDS:
                save(epoch, bi + 1, rng_at_start)
                last_save = time.perf_counter()
            if deadline is not None and time.perf_counter() > deadline:
                out_of_time = True
                break
        rep.losses.append(ep_loss / max(1, ep_n))
        head.eval()
        held_res = evaluate(head, net, held, cfg.steps, cfg.batch, cfg.bf16)
        head.train()
        rep.held.append(held_res)
        log(
            f"epoch {epoch + 1}: train loss {rep.losses[-1]:.3f}, held-back loss "
            f"{held_res[0]:.3f}, acceptance {held_res[1]:.3f}, tokens/round (chain of "
            f"{cfg.steps}) {held_res[2]:.2f}" + (" (time budget reached)" if out_of_time else "")
        )
        if out_of_time:
            break
        save(epoch + 1, 0, rng.getstate())
        last_save = time.perf_counter()
    bar.close()
    rep.seconds = time.perf_counter() - t0
    head.eval()
    head.requires_grad_(False)
    return head, rep


def _offsets(cfg: TrainConfig, n: int, step: int) -> torch.Tensor | None:
    """The batch's anchor offsets, drawn from the step number (a continued run draws the
    same ones as a run never stopped)."""
    if not cfg.anchor_offset:
        return None
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, cfg.anchor_offset + 1, (n,), generator=g)


def _tokens(samples: list[Sample]) -> int:
    return sum(int(s.ids.numel()) for s in samples)
