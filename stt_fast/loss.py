"""Compact softmax cross entropy: cross entropy plus a term that tightens each class.

The paper's exact formula is not public; this is the project's formulation (docs/model.md):

    q_i     = softmax of sample i's logits with its target class removed   (K - 1 classes)
    compact = mean over ordered pairs (i, j), i != j, y_i == y_j, of 0.5 * (KL(q_i || q_j) + KL(q_j || q_i))
    loss    = cross_entropy(logits, y) + lambda * compact

A batch with no same-class pair has compact = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def non_target_log_probs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log q_i: [B, K] logits, [B] targets -> [B, K-1] log-softmax over the non-target classes."""
    batch, classes = logits.shape
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[torch.arange(batch, device=logits.device), targets] = False
    return F.log_softmax(logits[keep].view(batch, classes - 1), dim=-1)


def compact_term(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean symmetric KL between the non-target distributions of same-class pairs (a scalar)."""
    same = targets[:, None] == targets[None, :]
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return logits.sum() * 0.0  # keeps the graph (and the dtype) without contributing
    log_q = non_target_log_probs(logits.float(), targets)
    q = log_q.exp()
    # KL(q_i || q_j) = sum_c q_i log q_i - sum_c q_i log q_j, for all pairs at once: [B, B]
    kl = (q * log_q).sum(-1, keepdim=True) - q @ log_q.T
    return (0.5 * (kl + kl.T))[same].mean()


class CompactSoftmaxCrossEntropy(nn.Module):
    """loss = CE(logits, y) + lambda_compact * compact_term(logits, y).

    logits [B, K] (K >= 2), targets [B] int64 class indices. lambda_compact = 0 gives plain cross
    entropy. The default of 0.1 is this project's choice (the paper's value is not public).
    """

    def __init__(self, lambda_compact: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if lambda_compact < 0:
            raise ValueError(f"lambda_compact must be >= 0, got {lambda_compact}")
        self.lambda_compact = lambda_compact
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"logits must be [B, K] with K >= 2, got shape {tuple(logits.shape)}")
        if targets.shape != logits.shape[:1]:
            raise ValueError(f"targets must be [B]={logits.shape[0]}, got shape {tuple(targets.shape)}")
        ce = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        if self.lambda_compact == 0:
            return ce
        return ce + self.lambda_compact * compact_term(logits, targets)
