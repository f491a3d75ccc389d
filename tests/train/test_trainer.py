"""Training a head: the loss falls and held-back acceptance rises on a tiny target's own text."""

from __future__ import annotations

import pytest
import torch
from drafting_helpers import tiny_llama

from veridraft.decode import decode
from veridraft.drafters.eagle import default_aux_ids
from veridraft.sampling import SamplingParams
from veridraft.train.features import target_features
from veridraft.train.head import new_head
from veridraft.train.trainer import TrainConfig, draft_vocab, evaluate, train

pytestmark = pytest.mark.usefixtures("one_thread")


def own_text(net, n: int, length: int = 48, seed: int = 0):
    """Samples of the target's own sampled continuations of random prompts, with features."""
    layers = tuple(i - 1 for i in default_aux_ids(net.config.n_layers))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(0, net.config.vocab_size, (6,), generator=g).tolist()
        new, _ = decode(
            net,
            prompt,
            max_new_tokens=length,
            sampling=SamplingParams(temperature=0.3),
            generator=g,
        )
        ids = prompt + new
        out.append(target_features(net, ids, layers, [True] * (len(ids) - 1) + [False]))
    return out


def test_training_lowers_loss_and_raises_acceptance(tmp_path):
    net = tiny_llama(tmp_path / "t", layers=2, vocab=64, positions=256)
    samples = own_text(net, 60)
    held = samples[-6:]
    aux_ids = default_aux_ids(net.config.n_layers)
    cfg = TrainConfig(steps=3, epochs=8, lr=3e-3, batch=4, holdout=0.1, draft_vocab=48)
    untrained = new_head(net, draft_vocab(samples[:-6], 48, 64), aux_ids=aux_ids)
    loss0, alpha0, tau0 = evaluate(untrained, net, held, 3, 4)
    head, rep = train(net, samples, cfg, aux_ids=aux_ids, log=lambda s: None)
    loss1, alpha1, tau1 = rep.held[-1]
    assert rep.losses[-1] < rep.losses[0]
    assert loss1 < loss0 - 0.2, (loss0, loss1)
    # the target's text is hard to predict (a random model: near-ties everywhere), so the bar
    # is a clear rise over the untrained head, not a useful drafter
    assert alpha1 > alpha0 + 0.05, (alpha0, alpha1)
    assert tau1 > tau0, (tau0, tau1)
    assert rep.seconds < 30


def test_a_stopped_training_run_continues_where_it_stopped(tmp_path, monkeypatch):
    """A run stopped mid-epoch and started again ends with the same head, bit for bit, as a
    run never stopped: the checkpoint holds the head, the optimiser and the epoch's order."""
    from veridraft.train import trainer

    net = tiny_llama(tmp_path / "t", layers=2, vocab=64, positions=256)
    samples = own_text(net, 20, length=24)
    aux_ids = default_aux_ids(net.config.n_layers)
    cfg = TrainConfig(steps=2, epochs=2, lr=3e-3, batch=4, holdout=0.1, draft_vocab=48)
    quiet = dict(aux_ids=aux_ids, log=lambda s: None)
    whole, _ = train(net, samples, cfg, **quiet)

    ckpt = tmp_path / "run.pt"
    monkeypatch.setattr(trainer, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint after every step
    real_ttt, calls = trainer.ttt, []

    def stops_at_the_seventh(*a, **k):  # 5 steps per epoch: dies inside the second epoch
        calls.append(1)
        if len(calls) == 7 + 1:  # + the held-back evaluation's call after epoch 1
            raise KeyboardInterrupt
        return real_ttt(*a, **k)

    monkeypatch.setattr(trainer, "ttt", stops_at_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        train(net, samples, cfg, checkpoint=ckpt, **quiet)
    assert ckpt.is_file()
    counted: list[int] = []

    def counts(*a, **k):
        counted.append(1)
        return real_ttt(*a, **k)

    monkeypatch.setattr(trainer, "ttt", counts)
    resumed, rep = train(net, samples, cfg, checkpoint=ckpt, **quiet)
    # only the 4 steps left (6 were checkpointed) and the last epoch's evaluation ran
    assert len(counted) == 4 + 1, len(counted)
    assert rep.steps == 10 and len(rep.losses) == 2
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # control: a different setting does not continue from that checkpoint
    other = TrainConfig(steps=2, epochs=2, lr=1e-3, batch=4, holdout=0.1, draft_vocab=48)
    logs: list[str] = []
    train(net, samples, other, checkpoint=ckpt, aux_ids=aux_ids, log=logs.append)
    assert any("starting anew" in line for line in logs)
