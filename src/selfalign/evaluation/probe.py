"""Linear probing and CKNNA of feature sets.

Linear probe (as MAE/SRA): ``BatchNorm1d(affine=False)`` then one ``Linear`` layer, trained with
AdamW and cross-entropy on the training features, accuracy on held-out features.

CKNNA (Huh et al. 2024, "The Platonic Representation Hypothesis"; the alignment score of the
REPA paper): CKA restricted to mutual k-nearest neighbours. With inner-product kernels
``K = A A^T``, ``L = B B^T`` (rows L2-normalised) and ``M`` the mask of pairs that are among each
other's top-k neighbours in *both* kernels (diagonal excluded),
``CKNNA = HSIC(M*K, M*L) / sqrt(HSIC(M_K*K, M_K*K) HSIC(M_L*L, M_L*L))`` with the unbiased HSIC
estimator (Song et al. 2012), as in the platonic-rep code; REPA uses k = 10.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int | None = None, epochs: int = 50, batch_size: int = 256, lr: float = 1e-2,
                 weight_decay: float = 0.0, seed: int = 0) -> float:
    """Test accuracy of a BatchNorm(affine=False) + Linear probe trained on ``train_x``."""
    train_x, test_x = train_x.float(), test_x.float()
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)   # the Linear layer's initialisation
    probe = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
                          nn.Linear(train_x.shape[1], num_classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    probe.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            if len(index) < 2:        # BatchNorm needs two examples
                continue
            loss = F.cross_entropy(probe(train_x[index]), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    probe.eval()
    with torch.no_grad():
        return float((probe(test_x).argmax(1) == test_y).float().mean())


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    m = k.shape[0]
    k = k.clone().fill_diagonal_(0)
    l = l.clone().fill_diagonal_(0)
    value = ((k * l.T).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2))
             - 2 * (k @ l).sum() / (m - 2))
    return value / (m * (m - 3))


def _knn_mask(kernel: torch.Tensor, topk: int) -> torch.Tensor:
    scores = kernel.clone().fill_diagonal_(float("-inf"))
    index = scores.topk(topk, dim=1).indices
    return torch.zeros_like(kernel).scatter_(1, index, 1.0)


def cknna(features_a: torch.Tensor, features_b: torch.Tensor, topk: int = 10, normalize: bool = True) -> float:
    """CKNNA alignment of two feature sets of the same N examples, ``(N, D_a)`` and ``(N, D_b)``."""
    a, b = features_a.double().flatten(1), features_b.double().flatten(1)
    if len(a) != len(b):
        raise ValueError(f"CKNNA compares features of the same examples: got {len(a)} and {len(b)} rows")
    if not 2 <= topk < len(a) - 1 or len(a) < 4:
        raise ValueError(f"CKNNA needs 2 <= topk < N - 1 and N >= 4; got topk={topk}, N={len(a)}")
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    k, l = a @ a.T, b @ b.T
    mask_k, mask_l = _knn_mask(k, topk), _knn_mask(l, topk)

    def similarity(x, y, mask):
        return _hsic_unbiased(mask * x, mask * y)

    kl = similarity(k, l, mask_k * mask_l)
    kk = similarity(k, k, mask_k)
    ll = similarity(l, l, mask_l)
    return float(kl / (torch.sqrt(kk * ll) + 1e-6))
