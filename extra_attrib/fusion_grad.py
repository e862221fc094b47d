"""FusionGrad: NoiseGrad + SmoothGrad around any Captum attribution method.

Bykov et al., "NoiseGrad -- Enhancing Explanations by Introducing Stochasticity to Model Weights",
AAAI 2022. The wrapped method is averaged over ``n`` noisy copies of the model's weights times
``m`` noisy copies of the input. The user's model is never written: the noisy weights are
substituted with :func:`torch.func.functional_call` for the duration of each wrapped call.
"""

import functools
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from captum.attr import Attribution, GradientAttribution, PerturbationAttribution
from captum.log import log_usage
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from tqdm import tqdm

from extra_attrib._checks import check_bool, check_int, check_nonnegative, check_real
from extra_attrib._fusion_batches import (
    baseline_kind,
    bind_extra_args,
    check_split,
    chunk_plan,
    expand_kwargs,
)
from extra_attrib._model_state import model_state_kept, uninitialized_names
from extra_attrib._noise import input_noise_scale, noisy_rows, perturb

TensorOrTuple = Union[Tensor, Tuple[Tensor, ...]]


_PREFIX = "model."


class _Runner(nn.Module):
    """Holds the user's model as its only child.

    So ``functional_call`` substitutes the model's parameters and buffers for one whole wrapped
    ``attribute`` call (every forward pass, hook and ``self.model`` access inside it), not just for
    one forward pass.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, thunk: Any) -> Any:
        return thunk()


class _UseWatch(TorchFunctionMode):
    """Notes whether any of ``tensors`` is passed to a torch function while a wrapped call runs.

    This is the check that the noisy weights reach the computation at all.
    """

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        super().__init__()
        self.ids = {id(t) for t in tensors}
        self.seen = not self.ids

    def wrap(self, call: Callable[[], Any]) -> Callable[[], Any]:
        if self.seen:
            return call

        def watched() -> Any:
            with self:
                return call()

        return watched

    def __torch_function__(
        self, func: Any, types: Any, args: Tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if not self.seen:
            self.seen = any(id(a) in self.ids for a in tree_leaves((args, kwargs)))
        return func(*args, **kwargs)


def _check_materialised(model: nn.Module) -> None:
    names = uninitialized_names(model)
    if names:
        raise ValueError(
            f"FusionGrad: the model has uninitialised lazy parameters or buffers "
            f"({', '.join(names)}), which cannot take weight noise; run one forward pass "
            "(model(x)) before FusionGrad so that they exist"
        )


class FusionGrad(PerturbationAttribution):
    r"""FusionGrad (NoiseGrad + SmoothGrad) around any Captum attribution method.

    For ``i = 1..n`` the model's weights are perturbed, ``W_i = W * eta_i`` with
    ``eta_i ~ N(mean, std^2)`` element-wise (NoiseGrad; ``W + eta_i`` with
    ``additive_noise=True``); for each ``W_i``, ``m`` noisy inputs ``x_ij = x + eps_ij`` are
    drawn (SmoothGrad; ``x * eps_ij`` with ``sg_additive_noise=False``). The result is the
    mean of the wrapped method's attributions over all ``n * m`` pairs::

        FusionGrad(x) = 1/(n m) sum_i sum_j A(W_i, x_ij)

    ``n=1`` with ``std=0`` is SmoothGrad alone, ``m=1`` with ``sg_std=0`` is NoiseGrad alone,
    and ``n=1, m=1, std=0, sg_std=0`` is exactly the wrapped method.

    The user's model is never written. Each noisy weight sample is a fresh set of tensors that
    :func:`torch.func.functional_call` substitutes for the model's parameters during one call of
    the wrapped method (buffers are substituted by fresh copies, so BatchNorm running statistics
    cannot drift). Parameters and buffers are bit-identical afterwards, also when the wrapped
    method raises, and the train/eval mode of every submodule is what it was (the guard of
    :mod:`extra_attrib._model_state`, shared with TiledOcclusion). Lazy modules must have run
    once before (their uninitialised parameters cannot take noise: ValueError). If the wrapped
    method never passes any of the noisy tensors to a torch operation (``model`` is not what its
    ``forward_func`` runs), the first call raises a ValueError instead of silently applying no
    weight noise. Because the
    substitution covers the whole wrapped call, methods that reach the model through
    ``self.model`` (DeepLift, LRP), hold hooks on its modules (GuidedBackprop, layer methods),
    or whose ``forward_func`` merely calls the model (e.g. ``lambda x: model(x).softmax(1)``
    with ``model=model``) all see the noisy weights. While a call runs, the model's parameters
    are swapped, so do not use the same model from another thread meanwhile.

    The ``m`` input samples of one weight sample go to the wrapped method as one batch of
    ``N * m`` rows, each example repeated ``m`` times consecutively (as :class:`NoiseTunnel`
    does). Per-example arguments are cut and repeated to match, by this rule: a ``target``
    tensor with more than one element or a list; every tensor of ``additional_forward_args``
    with ``N`` rows; every ``baselines`` or ``feature_mask`` tensor with ``N >= 2`` rows (one
    row broadcasts). Exception: the ``baselines`` of GradientShap, DeepLiftShap and their Layer
    and Neuron variants (also inside a NoiseTunnel) are a distribution and go whole to every
    call. For a method defined outside Captum and extra_attrib, ``N``-row ``baselines`` or
    ``feature_mask`` are ambiguous, so a ``batch_size`` that would split the examples raises a
    ValueError. ``batch_size`` bounds the rows per call. The mean is accumulated on the
    fly (never a stack of ``n * m`` attributions), in at least float32.

    Reproducibility: all noise is drawn from torch's default generator of the device holding
    each tensor (or from ``generator``), weights first, then the inputs of each call, so
    ``torch.manual_seed(s)`` before ``attribute`` reproduces the result exactly for the same
    arguments (``batch_size`` included) on the same device and software versions, provided the
    wrapped method is itself deterministic.

    Reference: Bykov et al., AAAI 2022, https://arxiv.org/abs/2106.10185

    Args:
        attribution_method (Attribution): an instance of any Captum attribution method,
            gradient based (Saliency, IntegratedGradients, InputXGradient,
            GuidedBackprop, DeepLift, layer methods, ...) or perturbation based
            (Occlusion, :class:`~extra_attrib.TiledOcclusion`, ...), or a
            :class:`~captum.attr.NoiseTunnel` around one.
        model (torch.nn.Module, optional): the model whose weights get noise. It must be
            the module the wrapped method's forward function runs.
            Default: None (the wrapped method's ``forward_func``, which must then
            be an ``nn.Module``).
    """

    def __init__(self, attribution_method: Attribution, model: Optional[nn.Module] = None) -> None:
        """Wrap ``attribution_method`` (see the class's ``Args``)."""
        if not isinstance(attribution_method, Attribution):
            raise TypeError(
                "attribution_method must be a captum.attr.Attribution instance (e.g. "
                f"Saliency(model)), got {type(attribution_method).__name__}: "
                f"{attribution_method!r}"
            )
        forward_func = attribution_method.forward_func
        if model is None:
            if not isinstance(forward_func, nn.Module):
                raise TypeError(
                    "FusionGrad needs the torch.nn.Module whose weights get noise, but "
                    f"model=None and attribution_method.forward_func is {forward_func!r} "
                    f"({type(forward_func).__name__}), not an nn.Module; pass model=<the "
                    "nn.Module that forward_func runs>"
                )
            model = forward_func
        elif not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module or None, got {type(model).__name__}: {model!r}"
            )
        PerturbationAttribution.__init__(self, forward_func)
        self.attribution_method = attribution_method
        self.model = model
        self._runner = _Runner(model)

    @property
    def multiplies_by_inputs(self) -> bool:
        """Whether the wrapped method multiplies by the inputs (as Captum's property)."""
        return self.attribution_method.multiplies_by_inputs

    def has_convergence_delta(self) -> bool:
        """Always False: the mean over samples has no convergence delta."""
        return False

    @log_usage()
    # Like every Captum PerturbationAttribution (newer Captum requires it): the wrapped gradient
    # methods switch gradients back on themselves, as they do inside NoiseTunnel.
    @torch.no_grad()
    def attribute(
        self,
        inputs: TensorOrTuple,
        *args: Any,
        target: Any = None,
        n: int = 10,
        m: int = 10,
        mean: Optional[float] = None,
        std: float = 0.2,
        sg_mean: Optional[float] = None,
        sg_std: Optional[float] = None,
        additive_noise: bool = False,
        sg_additive_noise: bool = True,
        batch_size: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        show_progress: bool = False,
        **kwargs: Any,
    ) -> TensorOrTuple:
        r"""Average the wrapped method's attributions over noisy weights and noisy inputs.

        Args:
            inputs (Tensor or tuple[Tensor, ...]): input of shape ``(N, ...)`` for which
                attributions are computed, or a tuple of such tensors (all with the
                same ``N``), exactly as the wrapped method takes it. Inputs that get
                noise must be floating point.
            *args (Any): further positional arguments of the wrapped method's ``attribute``
                after ``inputs`` (e.g. ``sliding_window_shapes`` for Occlusion).
                They are matched to its parameter names, so ``target``, ``baselines``
                etc. given here are expanded like keyword ones.
            target (int, tuple, Tensor or list, optional): output index or indices for which
                attributions are computed, in any form the wrapped method accepts.
                A tensor or list with one entry per example is repeated for each
                input sample. Default: None (the wrapped method's default).
            n (int, optional): number of noisy weight samples (NoiseGrad), ``>= 1``.
                Default: 10.
            m (int, optional): number of noisy input samples per weight sample (SmoothGrad),
                ``>= 1``. Default: 10.
            mean (float, optional): mean of the weight noise. Default: None, i.e. ``1.0``
                for multiplicative and ``0.0`` for additive weight noise (no bias).
            std (float, optional): standard deviation of the weight noise, ``>= 0``.
                Default: 0.2 (the paper's multiplicative ``N(1, 0.2)``). Deep
                ImageNet models may not survive it (see the user guide's FusionGrad
                page): check that noisy copies still predict the class you explain.
            sg_mean (float, optional): mean of the input noise, in input units for additive
                noise, the factor's mean for multiplicative noise. Default: None,
                i.e. ``0.0`` for additive and ``1.0`` for multiplicative input noise.
            sg_std (float, optional): standard deviation of the input noise, ``>= 0``: for
                additive noise an absolute value in input units, for multiplicative
                noise the factor's standard deviation. Default: None, i.e. for
                additive noise ``0.15 * (max - min)`` of each example, computed per
                input tensor (SmoothGrad's recommended 10-20 % of the range), and
                ``0.15`` for multiplicative noise.
            additive_noise (bool, optional): ``False``: weights ``W * N(mean, std^2)``;
                ``True``: ``W + N(mean, std^2)``. Default: False.
            sg_additive_noise (bool, optional): ``True``: inputs ``x + N(sg_mean, sg_std^2)``;
                ``False``: ``x * N(sg_mean, sg_std^2)``. Default: True.
            batch_size (int, optional): maximum number of input rows per wrapped call. With
                ``N * m`` rows or fewer everything runs in one call per weight sample;
                otherwise the ``m`` samples (and, if ``batch_size < N``, the examples)
                are split across calls. Default: None (one call of ``N * m`` rows).
            generator (torch.Generator, optional): source of all noise. Default: None
                (torch's default generator of each tensor's device, seeded by
                ``torch.manual_seed``).
            show_progress (bool, optional): show a progress bar over the ``n * calls``
                wrapped calls. Default: False.
            **kwargs (Any, optional): further keyword arguments of the wrapped method, e.g.
                ``n_steps`` for IntegratedGradients, ``sliding_window_shapes`` for
                Occlusion, ``k``/``window`` for TiledOcclusion, ``abs`` for Saliency.
                ``return_convergence_delta=True`` is not supported.

        Returns:
            *Tensor* or *tuple[Tensor, ...]* of **attributions**: the mean of the wrapped
            method's attributions over all ``n * m`` samples, one row per example, in the form
            the wrapped method returns (tuple in, tuple out). Input attributions have the
            same shape, dtype and device as the inputs.

        Example::

            >>> from captum.attr import Saliency
            >>> net = ImageClassifier()                 # takes N x 3 x 32 x 32
            >>> fg = FusionGrad(Saliency(net))
            >>> x = torch.rand(2, 3, 32, 32)
            >>> torch.manual_seed(0)                    # reproducible noise
            >>> attr = fg.attribute(x, target=3, n=8, m=8)   # 8 calls of 16 rows each
            >>> attr.shape
            torch.Size([2, 3, 32, 32])
        """
        for name, value in (
            ("additive_noise", additive_noise),
            ("sg_additive_noise", sg_additive_noise),
            ("show_progress", show_progress),
        ):
            check_bool(value, name)
        n = check_int(n, "n", minimum=1)
        m = check_int(m, "m", minimum=1)
        if batch_size is not None:
            batch_size = check_int(batch_size, "batch_size", minimum=1)
        std = check_nonnegative(std, "std")
        sg_std_value = None if sg_std is None else check_nonnegative(sg_std, "sg_std")
        mean = _resolve_mean("mean", mean, additive_noise)
        sg_mean = _resolve_mean("sg_mean", sg_mean, sg_additive_noise)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )

        is_tuple = isinstance(inputs, tuple)
        inputs_tuple = _check_inputs(inputs)
        num = inputs_tuple[0].shape[0]

        named = bind_extra_args(self.attribution_method, inputs, args, kwargs)
        if target is not None:
            if "target" in named:
                raise TypeError("target was given twice (positionally and as target=)")
            named["target"] = target
        if named.get("return_convergence_delta", False):
            raise ValueError(
                "return_convergence_delta=True is not supported by FusionGrad (the deltas of "
                "n * m different models and inputs do not combine into one); got "
                f"return_convergence_delta={named['return_convergence_delta']!r}"
            )
        kind = baseline_kind(self.attribution_method)
        expand_kwargs(named, num, 0, num, 1, kind)  # validates shapes before any work

        scales = [
            input_noise_scale(x, i, sg_std_value, sg_mean, sg_additive_noise)
            for i, x in enumerate(inputs_tuple)
        ]
        plan = chunk_plan(num, m, batch_size)
        check_split(named, num, plan, kind)
        running = _RunningMean(num)
        wants_grad = isinstance(self.attribution_method, GradientAttribution)
        _check_materialised(self.model)
        bar = tqdm(total=n * len(plan), desc="FusionGrad", disable=not show_progress)
        # Whether the first wrapped call still has to show that the noisy weights are used.
        unchecked = std != 0 or mean != (0.0 if additive_noise else 1.0)
        try:
            with model_state_kept(self.model):
                for _ in range(n):
                    state = self._noisy_state(mean, std, additive_noise, generator)
                    for e0, e1, reps in plan:
                        with torch.no_grad():
                            noisy = tuple(
                                noisy_rows(
                                    x, scale, e0, e1, reps, sg_mean, sg_additive_noise, generator
                                )
                                for x, scale in zip(inputs_tuple, scales)
                            )
                            if wants_grad:  # as NoiseTunnel does: fresh leaves needing grad
                                noisy = tuple(
                                    t.requires_grad_() if t.is_floating_point() else t
                                    for t in noisy
                                )
                            chunk_kwargs = expand_kwargs(named, num, e0, e1, reps, kind)
                        call = functools.partial(
                            self.attribution_method.attribute,
                            noisy if is_tuple else noisy[0],
                            **chunk_kwargs,
                        )
                        used = _UseWatch(state.values() if unchecked else ())
                        out = functional_call(
                            self._runner, state, (used.wrap(call),), tie_weights=False
                        )
                        unchecked = False  # the first call shows whether noise lands
                        if not used.seen:
                            raise ValueError(
                                "FusionGrad: the wrapped method never used the parameters of "
                                f"model={type(self.model).__name__}, so no weight noise would "
                                "be applied; pass model=<the nn.Module that the wrapped "
                                "method's forward_func runs> (or model=None when forward_func "
                                "is that module)"
                            )
                        running.add(out, e0, e1, reps)
                        bar.update(1)
                        del call, out, noisy  # free this chunk before the next one is built
                    del state  # free this weight sample before the next one is drawn
        finally:
            bar.close()

        result = running.result(n * m, inputs_tuple)
        _warn_if_not_finite(result, inputs_tuple, std, sg_std_value)
        return result

    def attribute_future(self) -> None:
        r"""Not implemented for FusionGrad."""
        raise NotImplementedError("attribute_future is not implemented for FusionGrad")

    def _noisy_state(
        self,
        mean: float,
        std: float,
        additive: bool,
        generator: Optional[torch.Generator],
    ) -> Dict[str, Tensor]:
        """One weight sample, keyed for ``functional_call`` on ``self._runner``.

        Noisy copies of the floating-point parameters, plain copies of the others and of all
        buffers, keyed for ``functional_call`` on ``self._runner``.

        There is exactly one key per (module object, attribute), so that every slot is swapped
        in and back out exactly once: torch's own tie handling swaps a module registered under
        two names twice and leaves the noisy tensor in the model. A tensor shared by several
        slots (tied weights) gets one noisy copy, used in all of them.
        """
        state: Dict[str, Tensor] = {}
        copies: Dict[int, Tensor] = {}
        with torch.no_grad():
            for prefix, module in self.model.named_modules(prefix=_PREFIX[:-1]):
                for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
                    if id(param) not in copies:
                        if param.is_floating_point():
                            value = perturb(param, mean, std, additive, generator)
                            copies[id(param)] = value.requires_grad_(param.requires_grad)
                        else:
                            copies[id(param)] = param.detach().clone()
                    state[f"{prefix}.{name}"] = copies[id(param)]
                for name, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
                    if id(buffer) not in copies:
                        copies[id(buffer)] = buffer.detach().clone()
                    state[f"{prefix}.{name}"] = copies[id(buffer)]
        return state


# ----------------------------------------------------------------------------- checks


def _warn_if_not_finite(
    result: TensorOrTuple, inputs: Tuple[Tensor, ...], std: float, sg_std: Optional[float]
) -> None:
    """Warn when the map holds NaN or Inf although the inputs are finite (noise too large)."""
    outputs = result if isinstance(result, tuple) else (result,)
    bad = sum(
        int((~torch.isfinite(t)).sum()) for t in outputs if t.is_floating_point() or t.is_complex()
    )
    finite_inputs = all(
        bool(torch.isfinite(x).all()) for x in inputs if x.is_floating_point() or x.is_complex()
    )
    if bad and finite_inputs:
        warnings.warn(
            f"FusionGrad: {bad} attribution value(s) are NaN or Inf although the inputs are "
            f"finite; with std={std!r} and sg_std={sg_std!r} the noisy weights or inputs "
            "probably overflow the model's dtype: lower std (the paper uses 0.2) or sg_std",
            RuntimeWarning,
            stacklevel=5,  # the user's call: attribute, no_grad and log_usage lie between
        )


def _resolve_mean(name: str, value: Optional[float], additive: bool) -> float:
    if value is None:
        return 0.0 if additive else 1.0
    return check_real(value, name)


def _check_inputs(inputs: Any) -> Tuple[Tensor, ...]:
    items = inputs if isinstance(inputs, tuple) else (inputs,)
    if len(items) == 0:
        raise ValueError("inputs must be a tensor or a non-empty tuple of tensors, got ()")
    for i, x in enumerate(items):
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(
                f"inputs[{i}] must have a non-empty batch dimension 0, got shape {tuple(x.shape)}"
            )
    num = items[0].shape[0]
    for i, x in enumerate(items):
        if x.shape[0] != num:
            raise ValueError(
                f"all inputs must have the same batch size; inputs[0] has {num} examples, "
                f"inputs[{i}] has {x.shape[0]} (shape {tuple(x.shape)})"
            )
    return tuple(items)


# ----------------------------------------------------------------------------- accumulation


class _RunningMean:
    """Per-example sums of the wrapped method's outputs over all calls (in at least float32).

    They are turned into means in the right dtype and device at the end. Holds ``N`` rows per
    output, never a stack of samples.
    """

    def __init__(self, num: int) -> None:
        self.num = num
        self.sums: List[Tensor] = []
        self.dtypes: List[torch.dtype] = []
        self.is_tuple = False

    def add(self, out: Any, e0: int, e1: int, reps: int) -> None:
        outs: Sequence[Any] = out if isinstance(out, tuple) else (out,)
        rows = (e1 - e0) * reps
        for j, a in enumerate(outs):
            if not isinstance(a, Tensor) or a.dim() == 0 or a.shape[0] != rows:
                got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
                raise TypeError(
                    "FusionGrad needs the wrapped method to return a tensor (or a tuple of "
                    f"tensors) with one row per input row ({rows}); output {j} is {got}"
                )
        if not self.sums:
            self.is_tuple = isinstance(out, tuple)
            self.dtypes = [a.dtype for a in outs]
            self.sums = [
                torch.zeros(
                    (self.num,) + tuple(a.shape[1:]),
                    dtype=torch.promote_types(a.dtype, torch.float32),
                    device=a.device,
                )
                for a in outs
            ]
        elif len(outs) != len(self.sums):
            raise TypeError(
                f"the wrapped method returned {len(outs)} outputs, earlier {len(self.sums)}"
            )
        for total, a in zip(self.sums, outs):
            block = a.detach().to(total.dtype).reshape((e1 - e0, reps) + tuple(a.shape[1:]))
            total[e0:e1] += block.sum(dim=1)

    def result(self, count: int, inputs: Tuple[Tensor, ...]) -> TensorOrTuple:
        """The means over ``count`` samples per example.

        Input attributions (one output per
        input, same shape) get the input's dtype and device; other outputs keep the wrapped
        method's dtype.
        """
        means = []
        for j, (total, dtype) in enumerate(zip(self.sums, self.dtypes)):
            mean = total.div_(count)
            if len(self.sums) == len(inputs) and mean.shape == inputs[j].shape:
                x = inputs[j]
                if x.is_floating_point():
                    dtype = x.dtype
                mean = mean.to(device=x.device)
            means.append(mean.to(dtype))
        return tuple(means) if self.is_tuple else means[0]
