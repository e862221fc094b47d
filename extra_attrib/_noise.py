"""Gaussian noise helpers for FusionGrad: pure functions of tensors, no hidden state.

Every function returns a *new* tensor and never writes its input, so they are safe to call on a
model's live parameters. Noise comes from ``generator`` when one is given, otherwise from torch's
default generator of the tensor's device (seeded by ``torch.manual_seed``).
"""

from typing import Optional, Union

import torch
from torch import Tensor

from extra_attrib._fusion_batches import rows

#: Default input-noise scale when ``sg_std=None``: for additive noise the standard deviation is
#: this fraction of each example's value range ``max(x) - min(x)`` (SmoothGrad's 10-20 %); for
#: multiplicative noise it is the standard deviation of the factor.
SG_STD_FRACTION = 0.15

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


def input_noise_scale(
    x: Tensor, index: int, sg_std: Optional[float], sg_mean: float, additive: bool
) -> Optional[Std]:
    """Standard deviation of FusionGrad's input noise for ``x``.

    Args:
        x (Tensor): One input tensor, shape ``(N, ...)``.
        index (int): Its position among the inputs, for the message.
        sg_std (float or None): The user's ``sg_std``; None for the default.
        sg_mean (float): Mean of the input noise.
        additive (bool): Additive (True) or multiplicative noise.

    Returns:
        float, Tensor or None: A float, a per-example ``(N,)`` tensor (the default for additive
        noise: :data:`SG_STD_FRACTION` of each example's range), or None when ``x`` gets no
        noise at all.
    """
    neutral = 0.0 if additive else 1.0
    if sg_std == 0 and sg_mean == neutral:
        return None
    if not x.is_floating_point():
        raise ValueError(
            f"inputs[{index}] has dtype {x.dtype}, which cannot take input noise; use "
            "sg_std=0 (and the default sg_mean) to apply weight noise only"
        )
    if sg_std is not None:
        return sg_std
    if not additive:
        return SG_STD_FRACTION
    flat = x.detach().reshape(x.shape[0], -1)
    return SG_STD_FRACTION * (flat.amax(dim=1) - flat.amin(dim=1))


def noisy_rows(
    x: Tensor,
    scale: Optional[Std],
    e0: int,
    e1: int,
    reps: int,
    sg_mean: float,
    additive: bool,
    generator: Optional[torch.Generator],
) -> Tensor:
    """A fresh tensor of rows of ``x`` with input noise applied; ``x`` is never written.

    Args:
        x (Tensor): Shape ``(N, ...)``.
        scale (float, Tensor or None): Output of :func:`input_noise_scale`.
        e0 (int): First example.
        e1 (int): One past the last example.
        reps (int): Copies of each example.
        sg_mean (float): Mean of the noise.
        additive (bool): Additive (True) or multiplicative noise.
        generator (torch.Generator or None): Source of the noise.

    Returns:
        Tensor: Shape ``((e1 - e0) * reps, ...)``.
    """
    block = rows(x.detach(), e0, e1, reps)
    if scale is None:
        return block.clone() if reps == 1 else block  # never the caller's tensor itself
    if isinstance(scale, Tensor):
        scale = rows(scale, e0, e1, reps).reshape((-1,) + (1,) * (x.dim() - 1))
    return perturb(block, sg_mean, scale, additive, generator)
