"""Ready-made ``score`` callables: what an attribution explains, for common kinds of model.

:meth:`TiledOcclusion.attribute` differences ``score(model output)`` between the input and its
occluded copies, then picks ``target`` out of it. The strings ``"raw"``, ``"softmax"`` and
``"log_softmax"`` cover classifiers that return a tensor of logits; the classes here cover the
rest, each an object to pass as ``score=``:

- classification: :class:`Classification` (the three strings, for models returning a dict or a
  tuple, such as ``{"logits": ...}``), :class:`MultiLabel` (the sigmoid of one class);
- semantic segmentation: :class:`ClassOverRegion` (one class over a boolean mask or a box of
  the output, for models returning a tensor or torchvision's ``{"out": ...}``);
- object detection: :class:`DetectedObject` (the confidence of one detected object, found again
  in every perturbed image by its class and its overlap with the reference box; torchvision's
  detection models);
- regression: :class:`Regression` (one output, or a function of several).

Each maps a batch of model outputs to a tensor with one row per example, which is what the
engines need; every one works with both engines (a detection model cannot be traced, so
``engine="auto"`` runs it densely and says why in ``last_engine_reason``). One score holds one
region or one box for the whole batch: explain images with different regions in separate calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from extra_attrib._checks import is_int
from extra_attrib._targets import score_function

__all__ = ["Classification", "ClassOverRegion", "DetectedObject", "MultiLabel", "Regression"]

OutputKey = Union[None, str, int]
CLASSIFICATION = ("raw", "softmax", "log_softmax")
PER_PIXEL = ("raw", "softmax", "log_softmax", "sigmoid")
REDUCTIONS = ("mean", "sum")


class Classification:
    r"""A classifier's logits, probabilities or log-probabilities, from any output structure.

    For a model returning a tensor ``(N, classes)`` this is the same as ``score="raw"``,
    ``"softmax"`` or ``"log_softmax"``; ``output`` picks the tensor out of a dict (e.g.
    Hugging Face's ``{"logits": ...}``) or a tuple. ``target`` is the class.

    Args:
        kind (str, optional): ``"raw"``, ``"softmax"`` or ``"log_softmax"`` (over dimension
            1). Default: ``"softmax"``
        output (str, int or None, optional): The key (dict) or index (tuple, list) of the
            logits in what the model returns; ignored when it returns a tensor. Default: None

    Example::

        >>> from extra_attrib import TiledOcclusion, scores
        >>> model = lambda x: {"logits": x.mean((2, 3))}     # (N, 3) logits in a dict
        >>> x = torch.rand(1, 3, 8, 8)
        >>> attr = TiledOcclusion(model).attribute(
        ...     x, target=2, window=4, score=scores.Classification("softmax", output="logits"))
    """

    def __init__(self, kind: str = "softmax", *, output: OutputKey = None) -> None:
        """Check the arguments (see the class's ``Args``)."""
        if kind not in CLASSIFICATION:
            raise ValueError(f"kind={kind!r} must be one of {CLASSIFICATION}")
        self.kind = kind
        self.output = _check_output_key(output)
        self._fn = score_function(kind)

    def __call__(self, outputs: Any) -> Tensor:
        """Scores ``(N, classes)`` of a batch of model outputs."""
        return self._fn(_pick(outputs, self.output, self))

    def __repr__(self) -> str:
        """The score and its settings, as error messages name it."""
        return f"Classification({self.kind!r}, output={self.output!r})"


class MultiLabel:
    r"""A multi-label classifier's probability of each label: the sigmoid of its logits.

    Multi-label models (several labels may hold at once) score each class independently with a
    sigmoid, not a softmax over the classes: this explains ``P(label present) =
    sigmoid(logit)`` of the ``target`` class, so occluding evidence for another label does not
    change it.

    Args:
        output (str, int or None, optional): The key (dict) or index (tuple, list) of the
            logits in what the model returns; ignored when it returns a tensor. Default: None

    Example::

        >>> from extra_attrib import TiledOcclusion, scores
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.Flatten(1),
        ...                             torch.nn.LazyLinear(4)).eval()   # 4 labels
        >>> x = torch.rand(2, 3, 8, 8)
        >>> attr = TiledOcclusion(model).attribute(x, target=1, window=4, k=2,
        ...                                        score=scores.MultiLabel())
    """

    def __init__(self, *, output: OutputKey = None) -> None:
        """Check the arguments (see the class's ``Args``)."""
        self.output = _check_output_key(output)

    def __call__(self, outputs: Any) -> Tensor:
        """Probabilities ``(N, labels)`` of a batch of model outputs."""
        logits = _pick(outputs, self.output, self)
        _require_real(logits, self)
        return torch.sigmoid(logits.to(_floating(logits.dtype)))

    def __repr__(self) -> str:
        """The score and its settings, as error messages name it."""
        return f"MultiLabel(output={self.output!r})"


class ClassOverRegion:
    r"""A segmentation model's score of each class over a region of its output.

    Per pixel, the output's class dimension (1) goes through ``per_pixel``; the result is
    reduced over the region's pixels, giving ``(N, classes)``; ``target`` is the class. So
    ``ClassOverRegion(box, per_pixel="softmax")`` with ``target=c`` explains the mean
    probability of class ``c`` over the box: which input pixels make the model see ``c`` there.

    Args:
        region (Tensor, array, sequence of 4 ints or None, optional): The output pixels
            explained: a boolean mask of the output's spatial shape (``(H, W)``, or
            ``(D, H, W)`` for volumes), or a box ``(x1, y1, x2, y2)`` in output pixels, columns
            ``x1 <= x < x2`` and rows ``y1 <= y < y2`` (torchvision's box convention), or
            None for the whole output. Checked against the output when the model first runs.
            Default: None
        output (str, int or None, optional): The key (dict) or index (tuple, list) of the
            ``(N, classes, *spatial)`` tensor in what the model returns; ignored when it returns
            a tensor. Default: ``"out"`` (torchvision's segmentation models)
        per_pixel (str, optional): ``"softmax"`` (class probability), ``"log_softmax"``,
            ``"raw"`` (logit) or ``"sigmoid"`` (for models with independent per-class
            channels, e.g. binary segmentation with one channel). Default: ``"softmax"``
        reduce (str, optional): ``"mean"`` or ``"sum"`` over the region's pixels.
            Default: ``"mean"``

    Example::

        >>> from torchvision.models.segmentation import lraspp_mobilenet_v3_large
        >>> from extra_attrib import TiledOcclusion, scores
        >>> model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
        >>> x = torch.rand(1, 3, 64, 64)
        >>> score = scores.ClassOverRegion((8, 16, 40, 48))      # x1, y1, x2, y2
        >>> attr = TiledOcclusion(model).attribute(x, target=15, window=16, k=2, score=score)
    """

    def __init__(
        self,
        region: Any = None,
        *,
        output: OutputKey = "out",
        per_pixel: str = "softmax",
        reduce: str = "mean",
    ) -> None:
        """Check the arguments (see the class's ``Args``)."""
        self.box: Optional[Tuple[int, int, int, int]] = None
        self.mask: Optional[Tensor] = None
        if isinstance(region, np.ndarray):
            region = torch.from_numpy(region)
        if isinstance(region, Tensor):
            if region.dtype != torch.bool:
                raise TypeError(
                    f"region must be a boolean mask or a box (x1, y1, x2, y2), got a tensor of "
                    f"{region.dtype}: compare it, e.g. region=labels == 3"
                )
            if region.dim() < 1 or not bool(region.any()):
                raise ValueError(
                    f"region of shape {tuple(region.shape)} selects no pixel: the mask needs "
                    "at least one True element"
                )
            self.mask = region.detach().cpu()
        elif region is not None:
            self.box = _check_box(region)
        if per_pixel not in PER_PIXEL:
            raise ValueError(f"per_pixel={per_pixel!r} must be one of {PER_PIXEL}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r} must be one of {REDUCTIONS}")
        self.output = _check_output_key(output)
        self.per_pixel = per_pixel
        self.reduce = reduce

    def __call__(self, outputs: Any) -> Tensor:
        """Class scores ``(N, classes)`` of a batch of model outputs over the region."""
        maps = _pick(outputs, self.output, self)
        _require_real(maps, self)
        if maps.dim() < 3:
            raise ValueError(
                f"{self!r} needs a (N, classes, *spatial) output, got shape "
                f"{tuple(maps.shape)}: for a classifier use score='softmax'"
            )
        maps = maps.to(_floating(maps.dtype))
        if self.per_pixel == "softmax":
            maps = maps.softmax(1)
        elif self.per_pixel == "log_softmax":
            maps = maps.log_softmax(1)
        elif self.per_pixel == "sigmoid":
            maps = maps.sigmoid()
        spatial = tuple(maps.shape[2:])
        if self.box is not None:
            picked = maps[(Ellipsis, *self._box_rows_columns(spatial))].flatten(2)
        elif self.mask is not None:
            if tuple(self.mask.shape) != spatial:
                raise ValueError(
                    f"region is a mask of shape {tuple(self.mask.shape)} but the model's output "
                    f"has spatial shape {spatial}: the mask must have the output's shape"
                )
            picked = maps[:, :, self.mask.to(maps.device)]
        else:
            picked = maps.flatten(2)
        return picked.mean(-1) if self.reduce == "mean" else picked.sum(-1)

    def _box_rows_columns(self, spatial: Tuple[int, ...]) -> Tuple[slice, slice]:
        assert self.box is not None
        x1, y1, x2, y2 = self.box
        if len(spatial) != 2 or x2 > spatial[1] or y2 > spatial[0]:
            raise ValueError(
                f"region={self.box} (x1, y1, x2, y2) is not inside the model's output of spatial "
                f"shape {spatial} (H, W): a box needs a 2D output and x2 <= W, y2 <= H"
            )
        return slice(y1, y2), slice(x1, x2)

    def __repr__(self) -> str:
        """The score and its settings, as error messages name it."""
        region = (
            self.box
            if self.box is not None
            else (f"mask{tuple(self.mask.shape)}" if self.mask is not None else None)
        )
        return (
            f"ClassOverRegion({region}, output={self.output!r}, per_pixel={self.per_pixel!r}, "
            f"reduce={self.reduce!r})"
        )


class DetectedObject:
    r"""The confidence of detected objects, found again in every perturbed image.

    For a detection model returning, per image, a dict with ``"boxes"`` ``(D, 4)`` (``x1, y1,
    x2, y2``), ``"labels"`` ``(D,)`` and ``"scores"`` ``(D,)``, as torchvision's do. Each
    reference object (a box and a class, usually one the model found on the unperturbed image)
    is matched in every image of the batch to the detections of the same class whose
    intersection over union (IoU) with the reference box is at least ``iou_threshold``; its
    score is the highest matched confidence (times that detection's IoU with
    ``weight_by_iou=True``), and 0 where no detection matches: an occlusion that makes the
    model lose the object, or move or relabel its box, lowers the score. This is the matching of
    D-RISE (Petsiuk et al., 2021) and of pytorch-grad-cam's box target, with the model's own
    confidence in place of a class-probability vector.

    Returns ``(N, objects)``: ``target=j`` explains object ``j`` (``target=None`` the only one);
    :meth:`TiledOcclusion.attribute_multi` explains several objects in one sweep.

    torchvision's detectors drop detections below ``box_score_thresh`` (0.05) and keep at most
    ``box_detections_per_img`` (100): an object that falls under the threshold scores 0. Build
    the model with ``box_score_thresh=0.0`` for a score that falls smoothly.

    A detection model takes the batch as a tensor ``(N, 3, H, W)``, which the engines give it;
    it cannot be traced, so ``engine="auto"`` runs the dense engine and says so in
    ``last_engine_reason``.

    Args:
        boxes (Tensor or sequence): Reference box(es) in the model's output coordinates (the
            input image's pixels for torchvision): ``(x1, y1, x2, y2)`` or ``(objects, 4)``,
            with ``x1 < x2`` and ``y1 < y2``.
        labels (int, Tensor or sequence): The class of each box: an int, or one per box.
        iou_threshold (float, optional): The least IoU, ``0 < iou_threshold <= 1``, of a
            detection with the reference box for it to be the same object. Default: 0.5
        weight_by_iou (bool, optional): Multiply the matched confidence by its IoU with the
            reference box, so a box that drifts lowers the score gradually. Default: False

    Example::

        >>> from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn
        >>> from extra_attrib import TiledOcclusion, scores
        >>> model = fasterrcnn_mobilenet_v3_large_320_fpn(weights="DEFAULT").eval()
        >>> x = torch.rand(1, 3, 320, 320)
        >>> found = model(x)[0]                          # the objects on the clean image
        >>> score = scores.DetectedObject(found["boxes"][0], int(found["labels"][0]))
        >>> attr = TiledOcclusion(model).attribute(x, window=32, k=2, score=score)
    """

    def __init__(
        self,
        boxes: Any,
        labels: Any,
        *,
        iou_threshold: float = 0.5,
        weight_by_iou: bool = False,
    ) -> None:
        """Check the arguments (see the class's ``Args``)."""
        ref = torch.as_tensor(_as_numbers(boxes, "boxes"))
        if ref.dim() == 1:
            ref = ref.unsqueeze(0)
        if ref.dim() != 2 or ref.shape[1] != 4 or ref.shape[0] == 0:
            raise ValueError(
                f"boxes of shape {tuple(torch.as_tensor(boxes).shape)} must be one box "
                "(x1, y1, x2, y2) or a (objects, 4) tensor of them"
            )
        if ref.dtype.is_complex or ref.dtype == torch.bool:
            raise TypeError(f"boxes must hold real numbers, got {ref.dtype}")
        ref = ref.to(torch.float64)
        if not bool(torch.isfinite(ref).all()) or bool(
            ((ref[:, 2] <= ref[:, 0]) | (ref[:, 3] <= ref[:, 1])).any()
        ):
            raise ValueError(
                f"boxes={ref.tolist()} must be finite (x1, y1, x2, y2) with x1 < x2 and y1 < y2"
            )
        label_tensor = torch.as_tensor(_as_numbers(labels, "labels"))
        if label_tensor.dtype.is_floating_point or label_tensor.dtype in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        ):
            raise TypeError(f"labels={labels!r} must be integer class indices")
        label_tensor = label_tensor.reshape(-1)
        if label_tensor.numel() == 1:
            label_tensor = label_tensor.expand(ref.shape[0])
        if label_tensor.numel() != ref.shape[0]:
            raise ValueError(
                f"labels has {label_tensor.numel()} entries for {ref.shape[0]} boxes: give one "
                "label, or one per box"
            )
        if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)):
            raise TypeError(f"iou_threshold={iou_threshold!r} must be a number in (0, 1]")
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold={iou_threshold!r} must be in (0, 1]")
        if not isinstance(weight_by_iou, bool):
            raise TypeError(f"weight_by_iou={weight_by_iou!r} must be True or False")
        self.boxes = ref
        self.labels = label_tensor.to(torch.long).clone()
        self.iou_threshold = float(iou_threshold)
        self.weight_by_iou = weight_by_iou

    def __call__(self, outputs: Any) -> Tensor:
        """Scores ``(N, objects)`` of a batch of detections (one dict per image)."""
        if not isinstance(outputs, (list, tuple)):
            raise TypeError(
                f"{self!r} needs the detections of each image (a list of dicts with 'boxes', "
                f"'labels' and 'scores', as torchvision's detection models return), got "
                f"{_describe(outputs)}"
            )
        rows = [self._image(i, detections) for i, detections in enumerate(outputs)]
        if not rows:
            return self.boxes.new_zeros((0, self.boxes.shape[0]))
        return torch.stack([r.to(rows[0].dtype) for r in rows])

    def _image(self, i: int, detections: Any) -> Tensor:
        if not isinstance(detections, Mapping) or not all(
            isinstance(detections.get(key), Tensor) for key in ("boxes", "labels", "scores")
        ):
            raise TypeError(
                f"{self!r}: the detections of image {i} are {_describe(detections)}; each image "
                "needs a dict of tensors 'boxes' (D, 4), 'labels' (D,) and 'scores' (D,)"
            )
        found, labels, confidence = detections["boxes"], detections["labels"], detections["scores"]
        dtype = _floating(confidence.dtype)
        iou = box_iou(self.boxes.to(found.device, torch.float64), found.to(torch.float64))
        same = self.labels.to(labels.device)[:, None] == labels.reshape(1, -1)
        matched = same & (iou >= self.iou_threshold)
        value = confidence.reshape(1, -1).to(torch.float64)
        if self.weight_by_iou:
            value = value * iou
        value = torch.where(matched, value, torch.zeros((), dtype=torch.float64))
        best = value.max(1).values if value.shape[1] else value.new_zeros(value.shape[0])
        return best.to(dtype)

    def __repr__(self) -> str:
        """The score and its settings, as error messages name it."""
        boxes = [[round(v, 2) for v in b] for b in self.boxes.tolist()]
        return (
            f"DetectedObject(boxes={boxes}, labels={self.labels.tolist()}, "
            f"iou_threshold={self.iou_threshold}, weight_by_iou={self.weight_by_iou})"
        )


class Regression:
    r"""One output of a regression model, or a function of several: one number per example.

    Args:
        index (int or tuple of int, optional): Which output: an index into each example's
            output (an int for ``(N, outputs)``, a tuple for more dimensions). Default: None
        combine (callable, optional): ``combine(y) -> Tensor (N,)`` of the whole output ``y``
            ``(N, ...)``, for a quantity made of several outputs (a difference, a norm, a
            weighted sum). Give ``index`` or ``combine``, not both. Default: None
        output (str, int or None, optional): The key (dict) or index (tuple, list) of the
            tensor in what the model returns; ignored when it returns a tensor. Default: None

    Returns ``(N,)``: leave ``target`` out (None).

    Example::

        >>> from extra_attrib import TiledOcclusion, scores
        >>> model = lambda x: x.flatten(1)[:, :3] * 2.0     # three regressed values
        >>> x = torch.rand(1, 1, 8, 8)
        >>> tiled = TiledOcclusion(model)
        >>> first = tiled.attribute(x, window=4, score=scores.Regression(index=0))
        >>> spread = tiled.attribute(x, window=4, score=scores.Regression(
        ...     combine=lambda y: y[:, 0] - y[:, 2]))
    """

    def __init__(
        self,
        index: Union[None, int, Tuple[int, ...]] = None,
        *,
        combine: Optional[Callable[[Tensor], Tensor]] = None,
        output: OutputKey = None,
    ) -> None:
        """Check the arguments (see the class's ``Args``)."""
        if (index is None) == (combine is None):
            raise ValueError(
                f"index={index!r}, combine={combine!r}: give exactly one of them (an output's "
                "index, or a function of the outputs)"
            )
        if index is not None:
            position = index if isinstance(index, tuple) else (index,)
            if not position or not all(is_int(i) for i in position):
                raise TypeError(f"index={index!r} must be an int or a tuple of ints")
            self.index: Optional[Tuple[int, ...]] = tuple(int(i) for i in position)
        else:
            self.index = None
        if combine is not None and not callable(combine):
            raise TypeError(f"combine={combine!r} must be callable: combine(y) -> Tensor (N,)")
        self.combine = combine
        self.output = _check_output_key(output)

    def __call__(self, outputs: Any) -> Tensor:
        """One value per example ``(N,)`` of a batch of model outputs."""
        y = _pick(outputs, self.output, self)
        if self.index is not None:
            if y.dim() - 1 != len(self.index) or not all(
                -s <= i < s for i, s in zip(self.index, y.shape[1:])
            ):
                raise ValueError(
                    f"index={self.index if len(self.index) > 1 else self.index[0]!r} does not "
                    f"index the model's per-example output of shape {tuple(y.shape[1:])}"
                )
            return y[(slice(None),) + self.index]
        assert self.combine is not None
        value = self.combine(y)
        if not isinstance(value, Tensor) or value.shape != y.shape[:1]:
            got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else _describe(value)
            raise ValueError(
                f"combine={_name(self.combine)} returned {got} for outputs of shape "
                f"{tuple(y.shape)}: it must return one value per example, shape ({y.shape[0]},)"
            )
        return value

    def __repr__(self) -> str:
        """The score and its settings, as error messages name it."""
        what = f"index={self.index!r}" if self.index is not None else "combine=..."
        return f"Regression({what}, output={self.output!r})"


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """Intersection over union of every box of ``a`` ``(A, 4)`` with every box of ``b`` ``(B, 4)``.

    Boxes are ``(x1, y1, x2, y2)``; a pair with no area in common has IoU 0.

    Returns:
        Tensor: ``(A, B)``.
    """
    left = torch.maximum(a[:, None, 0], b[None, :, 0])
    top = torch.maximum(a[:, None, 1], b[None, :, 1])
    right = torch.minimum(a[:, None, 2], b[None, :, 2])
    bottom = torch.minimum(a[:, None, 3], b[None, :, 3])
    inter = (right - left).clamp(min=0) * (bottom - top).clamp(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_output_key(output: Any) -> OutputKey:
    if output is None or isinstance(output, str) or is_int(output):
        return output if output is None or isinstance(output, str) else int(output)
    raise TypeError(
        f"output={output!r} must be a dict key (str), a tuple index (int) or None (the model "
        "returns a tensor)"
    )


def _pick(outputs: Any, output: OutputKey, owner: Any) -> Tensor:
    """The tensor a score works on: the output itself, or its ``output`` key or index."""
    if isinstance(outputs, Tensor):
        return outputs
    if output is None:
        raise TypeError(
            f"score={owner!r} got {_describe(outputs)} from the model: give output= the key "
            "(dict) or index (tuple) of the tensor to score, e.g. output='logits'"
        )
    if isinstance(outputs, Mapping):
        if output not in outputs:
            raise ValueError(
                f"score={owner!r}: output={output!r} is not a key of the model's output "
                f"(keys {list(outputs)!r:.80})"
            )
        picked = outputs[output]
    elif isinstance(outputs, (tuple, list)):
        if not isinstance(output, int) or not -len(outputs) <= output < len(outputs):
            raise ValueError(
                f"score={owner!r}: output={output!r} must be an index of the model's "
                f"{type(outputs).__name__} of {len(outputs)} outputs"
            )
        picked = outputs[output]
    else:
        raise TypeError(
            f"score={owner!r} cannot pick output={output!r} out of {_describe(outputs)}"
        )
    if not isinstance(picked, Tensor):
        raise TypeError(
            f"score={owner!r}: the model's output[{output!r}] is {_describe(picked)}, not a tensor"
        )
    return picked


def _require_real(values: Tensor, owner: Any) -> None:
    if values.is_complex() or values.dtype == torch.bool:
        raise TypeError(f"score={owner!r} needs real numbers, but the model gave {values.dtype}")


def _floating(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _check_box(region: Any) -> Tuple[int, int, int, int]:
    values = list(region) if isinstance(region, (tuple, list)) else None
    if values is None or len(values) != 4 or not all(is_int(v) for v in values):
        raise TypeError(
            f"region={region!r} must be a boolean mask, a box (x1, y1, x2, y2) of 4 ints, or None"
        )
    x1, y1, x2, y2 = (int(v) for v in values)
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        raise ValueError(
            f"region={region!r} must be a box (x1, y1, x2, y2) with 0 <= x1 < x2 and 0 <= y1 < y2"
        )
    return x1, y1, x2, y2


def _as_numbers(value: Any, name: str) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    raise TypeError(f"{name}={value!r} must be a tensor, an array or a sequence of numbers")


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)!r:.80}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
