"""Small image batches shared by the image-tokenizer tests."""

import torch


def squares(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Coloured squares on black: a small stand-in for the shapes data, [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 3, size, size)
    for i in range(n):
        s = int(torch.randint(4, size // 2 + 1, (1,), generator=g))
        y0, x0 = (int(v) for v in torch.randint(0, size - s + 1, (2,), generator=g))
        x[i, :, y0 : y0 + s, x0 : x0 + s] = torch.rand(3, 1, 1, generator=g)
    return x
