"""Evaluating attributions: a Quantus adapter and the insertion / deletion curves.

- :func:`quantus_explain_func` turns any Captum-style attribution method (ours or Captum's) into
  the ``explain_func(model=..., inputs=..., targets=..., **kwargs) -> np.ndarray`` that
  `Quantus <https://github.com/understandable-machine-intelligence-lab/Quantus>`_ metrics call.
- :func:`perturbation_curve` and :func:`area_under_curve` compute RISE's insertion and deletion
  curves (Petsiuk et al., BMVC 2018). Quantus has the deletion curve (``quantus.PixelFlipping``) but
  no insertion curve.
- :func:`break_ties` perturbs attributions by far less than any real difference, so that metrics
  ranking them do not order equal values by their position in memory.

Nothing here imports Quantus: install it with ``pip install extra_attrib[eval]``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
from captum.attr import Attribution
from torch import Tensor, nn

from extra_attrib._checks import check_bool, check_int, check_nonnegative, check_optional_int
from extra_attrib._model_state import model_state_kept
from extra_attrib._targets import ScoreType, score_function

MethodSpec = Union[str, Callable[[nn.Module], Attribution]]

CHANNEL_REDUCTIONS = ("sum", "mean", None)
CURVE_MODES = ("insertion", "deletion")


def _resolve_method(method: MethodSpec) -> Callable[[nn.Module], Attribution]:
    """A factory ``model -> Attribution`` for a name, a class or a factory."""
    if isinstance(method, Attribution):
        raise TypeError(
            f"method must be a name, an Attribution class or a factory model -> Attribution, got "
            f"the instance {type(method).__name__}(...): Quantus calls explain_func with other "
            f"models than yours (e.g. MPRT's randomised copies), so the method must be built per "
            f"call; pass {type(method).__name__} or `lambda model: ...` instead"
        )
    if isinstance(method, str):
        import captum.attr

        import extra_attrib

        cls = getattr(extra_attrib, method, None) or getattr(captum.attr, method, None)
        if not (isinstance(cls, type) and issubclass(cls, Attribution)):
            raise ValueError(
                f"method={method!r} is not an attribution class of extra_attrib or captum.attr; "
                f"for methods that wrap another (NoiseTunnel, FusionGrad) pass a factory such as "
                f"`lambda model: NoiseTunnel(Saliency(model))`"
            )
        return cls
    if not callable(method):
        raise TypeError(
            f"method must be a name, an Attribution class or a callable model -> Attribution, got "
            f"{type(method).__name__}"
        )
    return method


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> Optional[torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside the block only; the caller's RNG state is restored after it."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def break_ties(
    attributions: np.ndarray, seed: Optional[Union[int, np.random.Generator]] = None, scale=1e-6
) -> np.ndarray:
    """Add uniform noise far below any real difference, so that equal values rank randomly.

    Metrics that sort attributions (pixel flipping, region perturbation, rank accuracy, the pointing
    game's ``argmax``) otherwise order equal values by their index: a blocky occlusion map would be
    read in raster order, which favours or penalises it by accident.

    Args:
        attributions (np.ndarray): Attributions of shape ``(N, ...)``.
        seed (int, np.random.Generator or None, optional): Seed or generator of the noise.
            Default: None (fresh entropy).
        scale (float, optional): Noise amplitude relative to each example's largest absolute
            attribution. Default: 1e-6.

    Returns:
        np.ndarray: ``attributions + noise`` as float64, same shape. An example whose attributions
        are all zero gets noise of amplitude ``scale``.

    Example::

        >>> break_ties(np.zeros((1, 1, 2, 2)), seed=0).argmax()  # random, not always 0
    """
    a = np.asarray(attributions, dtype=np.float64)
    if a.ndim < 1:
        raise ValueError(f"attributions must have a batch dimension, got shape {a.shape}")
    scale = check_nonnegative(scale, "scale", strict=True)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    peak = np.abs(a).reshape(len(a), -1).max(axis=1, initial=0.0) if a.size else np.zeros(len(a))
    peak = np.where(peak > 0, peak, 1.0).reshape((-1,) + (1,) * (a.ndim - 1))
    return a + rng.uniform(-scale, scale, size=a.shape) * peak


def quantus_explain_func(
    method: MethodSpec,
    *,
    channel_reduction: Optional[str] = "sum",
    seed: Optional[int] = None,
    tie_break: bool = False,
    **method_kwargs: Any,
) -> Callable[..., np.ndarray]:
    r"""Wrap an attribution method as a Quantus ``explain_func``.

    Quantus metrics call ``explain_func(model=model, inputs=x, targets=y, **explain_func_kwargs)``
    with numpy arrays in channel-first layout and expect a numpy array with one attribution map per
    input. The returned callable builds the method anew on the model it is given (MPRT passes
    randomised copies of the model), moves the inputs and targets to the model's device, calls
    ``attribute`` and reduces the channels as Quantus's own Captum explainer does (sum over
    dimension 1, kept as size 1), giving ``(N, 1, H, W)`` for images.

    Args:
        method (str, type or callable): What to explain with. A class name from
            ``extra_attrib`` or ``captum.attr`` (``"TiledOcclusion"``, ``"Occlusion"``,
            ``"Saliency"``, ...), an attribution class, or a factory ``model -> Attribution`` for
            methods that wrap another, e.g. ``lambda m: NoiseTunnel(TiledOcclusion(m))`` or
            ``lambda m: FusionGrad(Saliency(m), model=m)``. Not an instance: it would be bound to
            one model.
        channel_reduction (str or None, optional): ``"sum"`` or ``"mean"`` over dimension 1 for
            inputs with 3 or more dimensions (kept as a size-1 dimension), or None to return the
            attributions unreduced. Default: ``"sum"``.
        seed (int or None, optional): If given, torch's RNG is seeded with it for each call (and
            restored afterwards), so stochastic methods (NoiseTunnel, FusionGrad) give the same
            maps for the same inputs. Default: None.
        tie_break (bool, optional): Apply :func:`break_ties` to the result (seeded from ``seed``),
            so that metrics which rank attributions break ties randomly. Default: False.
        **method_kwargs: Keyword arguments of the method's ``attribute`` (``window``, ``k``,
            ``baselines``, ``nt_samples``, ...). Keys in Quantus's ``explain_func_kwargs`` override
            them, except ``device``, which selects the device (default: the model's).

    Returns:
        callable: ``explain_func(model, inputs, targets, **kwargs) -> np.ndarray``.

    Example::

        >>> import quantus
        >>> explain = quantus_explain_func("TiledOcclusion", window=16, k=2)
        >>> metric = quantus.PointingGame(disable_warnings=True)
        >>> scores = metric(model=model, x_batch=x, y_batch=y, s_batch=masks,
        ...                 explain_func=explain)
    """
    factory = _resolve_method(method)
    if channel_reduction not in CHANNEL_REDUCTIONS:
        raise ValueError(
            f"channel_reduction={channel_reduction!r} is not supported: use one of "
            f"{CHANNEL_REDUCTIONS}"
        )
    seed = check_optional_int(seed, "seed", minimum=0)
    check_bool(tie_break, "tie_break")

    def explain_func(
        model: nn.Module, inputs: Any, targets: Any = None, **kwargs: Any
    ) -> np.ndarray:
        if not isinstance(model, nn.Module) and hasattr(model, "get_model"):
            model = model.get_model()  # a Quantus ModelInterface
        if not callable(model):
            raise TypeError(f"model must be a torch module, got {type(model).__name__}")
        device = kwargs.pop("device", None)
        if device is not None:
            device = torch.device(device)
        else:
            device = _model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
        dtype = _model_dtype(model) if isinstance(model, nn.Module) else None
        x = torch.as_tensor(np.asarray(inputs) if not torch.is_tensor(inputs) else inputs)
        if x.ndim < 2:
            raise ValueError(f"inputs must have shape (N, ...) with N examples, got {x.shape}")
        if not x.is_floating_point() or dtype is not None:
            x = x.to(dtype or torch.float32)
        x = x.to(device)
        target: Any = targets
        if targets is not None:
            t = torch.as_tensor(np.asarray(targets) if not torch.is_tensor(targets) else targets)
            if t.ndim == 0:
                target = int(t)
            else:
                if t.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"targets must give one target per input: {t.shape[0]} targets for "
                        f"{x.shape[0]} inputs"
                    )
                target = t.to(device=device, dtype=torch.long)
        call_kwargs = {**method_kwargs, **kwargs}
        attr_method = factory(model)
        with _seeded(None if seed is None else int(seed), device), torch.enable_grad():
            result = attr_method.attribute(x, target=target, **call_kwargs)
        if not torch.is_tensor(result) or result.shape != x.shape:
            raise TypeError(
                f"the method must return one tensor shaped like the inputs {tuple(x.shape)}, got "
                f"{type(result).__name__} {getattr(result, 'shape', '')}"
            )
        a = result.detach()
        if channel_reduction is not None and a.ndim >= 3:
            a = a.sum(dim=1, keepdim=True) if channel_reduction == "sum" else a.mean(1, True)
        out = a.cpu().numpy()
        if tie_break:
            out = break_ties(out, seed=seed)
        return out

    return explain_func


# ------------------------------------------------------------------------------------------------
# Insertion and deletion curves
# ------------------------------------------------------------------------------------------------


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur over the last two dimensions, reflect-padded."""
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    lead = x.shape[:-2]
    h, w = x.shape[-2:]
    y = x.reshape(-1, 1, h, w)
    y = torch.nn.functional.pad(y, (radius, radius, radius, radius), mode="reflect")
    y = torch.nn.functional.conv2d(y, kernel.view(1, 1, 1, -1))
    y = torch.nn.functional.conv2d(y, kernel.view(1, 1, -1, 1))
    return y.reshape(*lead, h, w)


def _ranking(a: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Per row, the indices of ``a`` from largest to smallest; ties in random order."""
    perm = torch.stack(
        [torch.randperm(a.shape[1], generator=generator) for _ in range(a.shape[0])]
    ).to(a.device)
    shuffled = torch.gather(a, 1, perm)
    order = torch.sort(shuffled, dim=1, descending=True, stable=True).indices
    return torch.gather(perm, 1, order)


@torch.no_grad()
def perturbation_curve(
    forward_func: Callable[[Tensor], Tensor],
    inputs: Tensor,
    attributions: Tensor,
    target: Optional[Union[int, Tensor]] = None,
    mode: str = "insertion",
    n_steps: int = 16,
    baseline: Union[str, float, Tensor, None] = None,
    score: ScoreType = "softmax",
    batch_size: int = 16,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""RISE's insertion or deletion curve of the target score.

    The positions of ``inputs`` are ranked by attribution (summed over the channel dimension 1 if
    ``attributions`` has several channels; ties in random order). *Deletion* starts from the input
    and replaces the top-ranked positions (all channels) by the baseline, a fraction ``j/n_steps``
    at step ``j``; *insertion* starts from the baseline and puts the input's top-ranked positions
    back. The curve is the target's score after each step, ``n_steps + 1`` values from 0 to all
    positions. Higher area is better for insertion, lower for deletion.

    Args:
        forward_func (callable): The model, ``(B, C, *S) -> (B, classes)``.
        inputs (Tensor): Inputs of shape ``(N, C, *S)``.
        attributions (Tensor): Shape ``(N, C, *S)``, ``(N, 1, *S)`` or ``(N, *S)``.
        target (int, Tensor or None, optional): Class per example (int or shape ``(N,)``); None
            takes the class the model predicts for the input. Default: None.
        mode (str, optional): ``"insertion"`` or ``"deletion"``. Default: ``"insertion"``.
        n_steps (int, optional): Number of steps between no and all positions. Default: 16.
        baseline (str, float, Tensor or None, optional): What replaces deleted positions / what
            insertion starts from: a number, a tensor broadcastable to ``inputs``, or
            ``"blur"`` (a Gaussian blur with sigma 5% of the image's longer side, 2-D images only,
            as in RISE). None means ``"blur"`` for insertion and ``0.0`` for deletion.
            Default: None.
        score (str or callable, optional): ``"softmax"`` (probability, as in RISE), ``"raw"``,
            ``"log_softmax"``, or a callable ``score(outputs) -> Tensor`` (it receives what the
            model returns, a dict or tuple too): the same scores as
            :meth:`TiledOcclusion.attribute`. Default: ``"softmax"``.
        batch_size (int, optional): Perturbed inputs per forward call. Default: 16.
        generator (torch.Generator or None, optional): For the random order of tied
            attributions. Default: None (torch's global RNG).

    Returns:
        Tensor: Shape ``(N, n_steps + 1)``, float32: the score after each step.

    Example::

        >>> curve = perturbation_curve(model, x, attr, target=y, mode="insertion")
        >>> area_under_curve(curve)  # higher is better for insertion
    """
    if not callable(forward_func):
        raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
    if not torch.is_tensor(inputs) or inputs.ndim < 2:
        raise ValueError(f"inputs must be a tensor of shape (N, C, ...), got {inputs!r:.60}")
    if mode not in CURVE_MODES:
        raise ValueError(f"mode={mode!r} is not supported: use one of {CURVE_MODES}")
    n_steps = check_int(n_steps, "n_steps", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    score_fn = score_function(score)
    n, spatial = inputs.shape[0], inputs.shape[2:]
    a = torch.as_tensor(attributions, device=inputs.device).to(torch.float64)
    if a.shape == inputs.shape or (a.ndim == inputs.ndim and a.shape[1] == 1):
        a = a.sum(dim=1)
    if a.shape != (n, *spatial):
        raise ValueError(
            f"attributions must have shape {(n, *inputs.shape[1:])}, {(n, 1, *spatial)} or "
            f"{(n, *spatial)} for inputs of shape {tuple(inputs.shape)}, got {tuple(a.shape)}"
        )
    if baseline is None:
        baseline = "blur" if mode == "insertion" else 0.0
    if isinstance(baseline, str):
        if baseline != "blur":
            raise ValueError(f"baseline={baseline!r} is not supported: use 'blur' or a number")
        if inputs.ndim != 4:
            raise ValueError(
                f"baseline='blur' needs inputs of shape (N, C, H, W), got {tuple(inputs.shape)}"
            )
        base = _gaussian_blur(inputs, sigma=0.05 * max(spatial))
    else:
        base = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
        base = base.expand_as(inputs)

    positions = math.prod(spatial)
    order = _ranking(a.reshape(n, positions), generator)
    # rank_of[i, p]: where position p comes in example i's order.
    rank_of = torch.empty_like(order)
    rank_of.scatter_(1, order, torch.arange(positions, device=order.device).expand(n, -1))
    counts = [round(j * positions / n_steps) for j in range(n_steps + 1)]

    curve = torch.empty(n, n_steps + 1, dtype=torch.float32)
    with model_state_kept(forward_func), torch.no_grad():
        if target is None:
            raw = forward_func(inputs)  # a dict or tuple (segmentation models): the scores'
            target = (raw if torch.is_tensor(raw) else score_fn(raw)).argmax(dim=1)
        tgt = torch.as_tensor(target, device=inputs.device).long().expand(n)
        for i in range(n):
            start, end = (base[i], inputs[i]) if mode == "insertion" else (inputs[i], base[i])
            ranks = rank_of[i].view(1, 1, *spatial)
            for b in range(0, n_steps + 1, batch_size):
                steps = torch.tensor(counts[b : b + batch_size], device=inputs.device)
                changed = ranks < steps.view(-1, *([1] * (len(spatial) + 1)))
                batch = torch.where(changed, end.unsqueeze(0), start.unsqueeze(0))
                out = score_fn(forward_func(batch))
                curve[i, b : b + len(steps)] = out[:, tgt[i]].float().cpu()
    return curve


def area_under_curve(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves sampled at equal steps over ``[0, 1]``.

    Args:
        curve (Tensor): Shape ``(N, n_steps + 1)``.

    Returns:
        Tensor: Shape ``(N,)``.
    """
    if not torch.is_tensor(curve) or curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(
            f"curve must be a tensor of shape (N, n_steps + 1) with n_steps >= 1, got "
            f"{getattr(curve, 'shape', type(curve).__name__)}"
        )
    c = curve.to(torch.float64)
    return ((c[:, 1:] + c[:, :-1]) / 2).mean(dim=1)
