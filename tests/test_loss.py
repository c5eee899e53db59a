"""CompactSoftmaxCrossEntropy: the properties of the formulation in docs/model.md."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from stt_fast import CompactSoftmaxCrossEntropy
from stt_fast.loss import compact_term


def _kl(p, q):
    return (p * (p.log() - q.log())).sum()


def _compact_by_pairs(logits, targets):
    """The definition, pair by pair, in float64."""
    logits = logits.double()
    terms = []
    for i, j in itertools.permutations(range(len(targets)), 2):
        if targets[i] != targets[j]:
            continue
        keep = [c for c in range(logits.shape[1]) if c != targets[i]]
        qi, qj = F.softmax(logits[i, keep], -1), F.softmax(logits[j, keep], -1)
        terms.append(0.5 * (_kl(qi, qj) + _kl(qj, qi)))
    return torch.stack(terms).mean()


def test_equals_cross_entropy_at_lambda_zero():
    logits, targets = torch.randn(6, 7), torch.tensor([0, 0, 1, 2, 2, 2])
    loss = CompactSoftmaxCrossEntropy(lambda_compact=0.0)(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_matches_pairwise_definition():
    logits, targets = torch.randn(9, 7), torch.tensor([0, 3, 0, 1, 3, 3, 6, 2, 1])
    torch.testing.assert_close(compact_term(logits, targets).double(), _compact_by_pairs(logits, targets),
                               rtol=1e-5, atol=1e-6)
    loss = CompactSoftmaxCrossEntropy(lambda_compact=0.7)(logits, targets)
    expected = F.cross_entropy(logits, targets) + 0.7 * _compact_by_pairs(logits, targets).float()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_zero_when_same_class_non_target_distributions_are_equal():
    # Same non-target logits up to a constant shift; the target logit differs freely.
    row = torch.randn(7)
    logits = torch.stack([row, row + 2.0, row - 1.0])
    logits[1, 4] += 5.0
    logits[2, 4] -= 3.0
    targets = torch.tensor([4, 4, 4])
    assert compact_term(logits, targets).abs().item() < 1e-6


def test_positive_when_same_class_distributions_differ():
    logits, targets = torch.randn(4, 7), torch.tensor([1, 1, 1, 1])
    assert compact_term(logits, targets).item() > 1e-4


def test_symmetric_in_sample_order():
    logits, targets = torch.randn(8, 7), torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    perm = torch.randperm(8)
    torch.testing.assert_close(compact_term(logits, targets), compact_term(logits[perm], targets[perm]))
    # the pair term itself is symmetric: swapping the two samples of a pair changes nothing
    pair = logits[[0, 2]]
    torch.testing.assert_close(compact_term(pair, targets[[0, 2]]), compact_term(pair.flip(0), targets[[0, 2]]))


def test_gradients_are_finite_even_for_extreme_logits():
    logits = (torch.randn(6, 7) * 50).requires_grad_()
    targets = torch.tensor([0, 0, 3, 3, 5, 5])
    CompactSoftmaxCrossEntropy(lambda_compact=1.0)(logits, targets).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_batch_without_same_class_pair_is_plain_cross_entropy():
    logits = torch.randn(4, 7, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3])
    loss = CompactSoftmaxCrossEntropy(lambda_compact=1.0)(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("logits,targets,message", [
    (torch.randn(4), torch.tensor([0, 1, 2, 3]), r"\[B, K\]"),
    (torch.randn(4, 7), torch.tensor([0, 1]), "targets"),
], ids=["1-D-logits", "targets-length"])
def test_bad_shapes(logits, targets, message):
    with pytest.raises(ValueError, match=message):
        CompactSoftmaxCrossEntropy()(logits, targets)
