"""Gaussian noise helpers for FusionGrad: pure functions of tensors, no hidden state.

Every function returns a *new* tensor and never writes its input, so they are safe to call on a
model's live parameters. Noise comes from ``generator`` when one is given, otherwise from torch's
default generator of the tensor's device (seeded by ``torch.manual_seed``).
"""

from typing import Optional, Union

import torch
from torch import Tensor

Std = Union[float, Tensor]


def normal_like(
    x: Tensor, mean: float, std: Std, generator: Optional[torch.Generator] = None
) -> Tensor:
    r"""Samples ``N(mean, std^2)`` with the shape, dtype and device of ``x``.

    Args:
        x (Tensor): shape ``(*S)``; only its shape, floating dtype and device are used.
        mean (float): mean of the distribution.
        std (float or Tensor): standard deviation; a tensor must broadcast to ``(*S)``
                    (e.g. ``(N, 1, ..., 1)`` for one value per example).
        generator (torch.Generator, optional): source of randomness. It may live on another
                    device than ``x``: the sample is drawn there and then moved.
                    Default: None (torch's default generator of ``x.device``).

    Returns:
        Tensor of shape ``(*S)``: ``mean + std * z`` with ``z ~ N(0, 1)`` i.i.d.
    """
    if not x.is_floating_point():
        raise TypeError(f"normal_like: x must be floating point, got dtype {x.dtype}")
    device = x.device if generator is None else generator.device
    z = torch.randn(x.shape, dtype=x.dtype, device=device, generator=generator)
    return z.to(x.device).mul_(std).add_(mean)


def perturb(
    x: Tensor,
    mean: float,
    std: Std,
    additive: bool,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Returns a noisy copy of ``x``; ``x`` itself is never written.

    Args:
        x (Tensor): shape ``(*S)``, floating point.
        mean (float): mean of the noise.
        std (float or Tensor): standard deviation of the noise (a tensor broadcasting to
                    ``(*S)`` gives one value per slice). A float ``0`` draws no random numbers.
        additive (bool): ``True``: ``x + N(mean, std^2)``; ``False``: ``x * N(mean, std^2)``.
        generator (torch.Generator, optional): see :func:`normal_like`. Default: None.

    Returns:
        Tensor of shape ``(*S)``, same dtype and device as ``x``. With ``std=0`` the result is
        exactly ``x + mean`` or ``x * mean`` (so ``x * 1`` is bit-identical to ``x``).
    """
    with torch.no_grad():
        if isinstance(std, (int, float)) and std == 0:
            noise: Union[float, Tensor] = float(mean)
        else:
            noise = normal_like(x, mean, std, generator)
        return x.detach() + noise if additive else x.detach() * noise
