"""Adapters for :mod:`benchmarks.localisation_sota`: each method as ``run(model, x, target, seed)``.

Each adapter explains one image ``x`` of shape ``(1, C, H, W)`` (model-input scaling, where 0 is
the grey occlusion baseline) for the raw output ``target`` and returns ``(map, evaluations)``:
the attribution map ``(H, W)`` (channels summed) and the number of model rows it ran. The
library methods run through :class:`Counter`, which counts every row the library passes to the
model, hidden ones included (Grad-CAM's clean pass, SHAP's extra passes, Lime's batches); a
gradient method's row is one forward and one backward pass. TiledOcclusion reports its own
count (``last_perturbations`` plus the clean pass), since the incremental engine runs parts of
the network rather than whole rows.

The adapters take the sizes that depend on the image (RISE's grid, SLIC's segment count, the
blur kernel, the CAM layer) as arguments, so that ``tests/test_localisation_sota.py`` can check
every one on a small model whose answer is known.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

Runner = Callable[[nn.Module, Tensor, int, int], Tuple[Tensor, int]]


class Counter(nn.Module):
    """The model, counting the rows of every forward call (``rows``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.rows = 0

    def forward(self, x: Tensor) -> Tensor:
        self.rows += int(x.shape[0])
        return self.model(x)


def _hw(a: Tensor) -> Tensor:
    """A map of shape ``(1, C, H, W)``, ``(C, H, W)``, ``(1, H, W)`` or ``(H, W)`` as ``(H, W)``."""
    a = a.detach().double()
    while a.dim() > 2:
        a = a.sum(0)
    return a


# --------------------------------------------------------------------------------------------
# Ours
# --------------------------------------------------------------------------------------------


def box_blur(x: Tensor, kernel: int) -> Tensor:
    """``x`` ``(1, C, H, W)`` blurred as SHAP's ``blur(kernel, kernel)`` masker blurs (cv2.blur)."""
    import cv2

    img = x[0].permute(1, 2, 0).numpy().astype(np.float32)
    out = cv2.blur(img, (kernel, kernel))
    if out.ndim == 2:
        out = out[:, :, None]
    return torch.from_numpy(out).permute(2, 0, 1)[None].to(x.dtype)


def tiled(
    window: int, k: int, refine: Optional[float] = None, blur: Optional[int] = None
) -> Runner:
    """``TiledOcclusion(window, k)``, grey (0) or box-blurred baseline, optional drill-down."""
    from extra_attrib import TiledOcclusion

    cache: Dict[int, TiledOcclusion] = {}  # one object per model: tuned chunk sizes carry over

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        occ = cache.setdefault(id(model), TiledOcclusion(model))
        baselines = box_blur(x, blur) if blur else 0
        a = occ.attribute(
            x,
            target=target,
            window=(x.shape[1], window, window),
            k=(1, k, k),
            baselines=baselines,
            refine=refine,
            engine="incremental",
        )
        return _hw(a), occ.last_perturbations + 1

    return run


# --------------------------------------------------------------------------------------------
# Grad-CAM family (pytorch-grad-cam)
# --------------------------------------------------------------------------------------------


def cam(name: str, layer: Callable[[nn.Module], nn.Module], batch_size: int = 32) -> Runner:
    """A ``pytorch_grad_cam`` method on the layer ``layer(model)``, upsampled as it does."""
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cls = getattr(pgc, name)

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        counted = Counter(model)
        with cls(model=counted, target_layers=[layer(model)]) as method:
            if hasattr(method, "batch_size"):  # ScoreCAM, AblationCAM: channels per batch
                method.batch_size = batch_size
            grey = method(input_tensor=x.clone(), targets=[ClassifierOutputTarget(target)])
        return _hw(torch.from_numpy(np.asarray(grey[0]))), counted.rows

    return run


# --------------------------------------------------------------------------------------------
# RISE (captum-rise)
# --------------------------------------------------------------------------------------------


def rise(n_masks: int, grid: int) -> Runner:
    """RISE (Petsiuk et al., 2018) from ``captum-rise``: ``n_masks`` random ``grid x grid``
    binary masks (p = 0.5), bilinearly upsampled and randomly shifted, occluding to 0."""
    from rise import RISE

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        counted = Counter(model)
        torch.manual_seed(seed)
        with torch.no_grad():
            a = RISE(counted).attribute(
                x, n_masks=n_masks, initial_mask_shapes=[(grid, grid)], target=target
            )
        return _hw(a), counted.rows

    return run


# --------------------------------------------------------------------------------------------
# SHAP Partition explainer
# --------------------------------------------------------------------------------------------


def shap_partition(max_evals: int, blur: Optional[int], batch_size: int = 50) -> Runner:
    """SHAP's Partition explainer with ``shap.maskers.Image``: ``blur(blur, blur)``, or a
    constant 0 (the grey occlusion baseline) when ``blur`` is None."""
    import shap

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        counted = Counter(model)
        img = x[0].permute(1, 2, 0).numpy().astype(np.float32)

        def f(z: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).permute(0, 3, 1, 2)
            with torch.no_grad():
                return counted(t)[:, target : target + 1].numpy()

        if blur:
            masker = shap.maskers.Image(f"blur({blur},{blur})", img.shape)
        else:
            masker = shap.maskers.Image(np.zeros(img.shape, np.float32))
        np.random.seed(seed % 2**32)
        explainer = shap.PartitionExplainer(f, masker)
        values = explainer(img[None], max_evals=max_evals, batch_size=batch_size, silent=True)
        v = np.asarray(values.values)[0, ..., 0]  # (H, W, C)
        return _hw(torch.from_numpy(v).permute(2, 0, 1)), counted.rows

    return run


# --------------------------------------------------------------------------------------------
# Superpixels: LIME and FeatureAblation (Captum)
# --------------------------------------------------------------------------------------------


def superpixels(x: Tensor, n_segments: int) -> Tensor:
    """SLIC superpixels of the image (rescaled to [0, 1]) as a ``(1, 1, H, W)`` feature mask."""
    from skimage.segmentation import slic

    img = x[0].permute(1, 2, 0).numpy().astype(np.float64)
    img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
    seg = slic(img, n_segments=n_segments, compactness=10, start_label=0, channel_axis=-1)
    return torch.from_numpy(seg.astype(np.int64))[None, None]


def lime(n_samples: int, n_segments: int) -> Runner:
    """Captum's ``Lime`` (its defaults: Lasso, exponential cosine kernel) on SLIC superpixels."""
    from captum.attr import Lime

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        counted = Counter(model)
        torch.manual_seed(seed)
        mask = superpixels(x, n_segments)
        with torch.no_grad():
            a = Lime(counted).attribute(
                x,
                target=target,
                feature_mask=mask,
                baselines=0.0,
                n_samples=n_samples,
                perturbations_per_eval=16,
            )
        return _hw(a), counted.rows

    return run


def feature_ablation(n_segments: int) -> Runner:
    """Captum's ``FeatureAblation`` over SLIC superpixels, to the grey baseline 0."""
    from captum.attr import FeatureAblation

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        counted = Counter(model)
        mask = superpixels(x, n_segments)
        with torch.no_grad():
            a = FeatureAblation(counted).attribute(
                x, target=target, feature_mask=mask, baselines=0.0, perturbations_per_eval=16
            )
        return _hw(a), counted.rows

    return run


# --------------------------------------------------------------------------------------------
# Gradients: Saliency, Integrated Gradients, SmoothGrad, NoiseGrad, FusionGrad
# --------------------------------------------------------------------------------------------


def gradient(
    base: str,
    steps: int = 1,
    n: int = 1,
    m: int = 1,
    std: float = 0.0,
    sg_std: float = 0.0,
) -> Runner:
    """``base`` ("saliency" or "ig" with ``steps``) under FusionGrad(n, m, std, sg_std).

    ``n = m = 1, std = sg_std = 0`` is the method alone; ``n = 1, std = 0`` is SmoothGrad;
    ``m = 1, sg_std = 0`` is NoiseGrad; both is FusionGrad (all through :class:`FusionGrad`).
    """
    from captum.attr import IntegratedGradients, Saliency

    from extra_attrib import FusionGrad

    def run(model: nn.Module, x: Tensor, target: int, seed: int) -> Tuple[Tensor, int]:
        counted = Counter(model)
        kwargs = {}
        if base == "saliency":
            method = Saliency(counted)
        elif base == "ig":
            method = IntegratedGradients(counted)
            kwargs = {"n_steps": steps, "baselines": 0.0}
        else:
            raise ValueError(f"base={base!r} must be 'saliency' or 'ig'")
        if n == 1 and m == 1 and std == 0 and sg_std == 0:
            a = method.attribute(x, target=target, **kwargs)
        else:
            gen = torch.Generator().manual_seed(seed)
            a = FusionGrad(method, model=model).attribute(
                x, target=target, n=n, m=m, std=std, sg_std=sg_std, generator=gen, **kwargs
            )
        return _hw(a), counted.rows

    return run
