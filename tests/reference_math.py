"""Independent reference implementations the tests compare the code against (not used by the code)."""

import math

import torch


def naive_dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II from its definition, one entry at a time."""
    d = torch.empty(n, n, dtype=torch.float64)
    for k in range(n):
        scale = math.sqrt(1.0 / n) if k == 0 else math.sqrt(2.0 / n)
        for i in range(n):
            d[k, i] = scale * math.cos(math.pi * (2 * i + 1) * k / (2 * n))
    return d
