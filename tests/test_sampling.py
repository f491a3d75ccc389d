import pytest
import torch

from veridraft import VeridraftError
from veridraft.sampling import SamplingParams, probs


def test_greedy_is_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    p = probs(logits, SamplingParams())
    assert p.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_softmax():
    logits = torch.tensor([1.0, 2.0, 3.0])
    p = probs(logits, SamplingParams(temperature=2.0))
    assert torch.allclose(p, (logits / 2).softmax(-1))


def test_top_k_keeps_k_largest():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    p = probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [False, True, False, True, False]
    assert p.sum().item() == pytest.approx(1.0)


def test_top_p_smallest_prefix_reaching_mass():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.8 keeps the first two; 0.81 keeps three.
    p0 = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p0.log()
    kept = probs(logits, SamplingParams(temperature=1.0, top_p=0.8)) > 0
    assert kept.tolist() == [True, True, False, False]
    kept = probs(logits, SamplingParams(temperature=1.0, top_p=0.81)) > 0
    assert kept.tolist() == [True, True, True, False]
    # The top token always survives, however small top_p is.
    assert (probs(logits, SamplingParams(temperature=1.0, top_p=1e-6)) > 0).sum() == 1


def test_rows_are_processed_independently():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.9)
    batch = probs(logits, params)
    for i in range(3):
        assert torch.allclose(batch[i], probs(logits[i], params))


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, word):
    with pytest.raises(VeridraftError, match=word):
        SamplingParams(**kwargs)
