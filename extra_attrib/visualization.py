"""Plots of attributions: images, image grids, 1D signals and 3D volumes (matplotlib).

Every function takes tensors or arrays, draws with zero-centred colour scales whose limits are the
``clip_percentile``-th percentile of the absolute attribution (so a few extreme values do not wash
out the map), and returns the :class:`matplotlib.figure.Figure`. Figures are built without pyplot:
nothing is shown or kept in pyplot's registry; in a notebook make the figure the cell's last
expression, in a script pass ``save_path=``. Pass ``ax=`` / ``axes=`` to draw into a figure of your
own.

Relation to :mod:`captum.attr.visualization`: the names of its views (``heat_map``,
``blended_heat_map``, ``original_image``) and signs are kept, and its ``masked_image`` and
``alpha_scaling`` views are a call away (:func:`to_hwc_numpy` gives the ``(H, W, C)`` arrays it
expects). The plots here are drawn anew because Captum's stop short where these functions are
needed: its image view raises an ``AssertionError`` on an all-zero map (common with occlusion on a
saturated model), its colour bar shows normalised rather than attribution units, it takes only
``(H, W, C)`` arrays, and ``visualize_timeseries_attr`` fails on matplotlib >= 3.9
(``cm.get_cmap`` was removed) and draws one patch per time step.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

__all__ = [
    "plot_attribution",
    "plot_attribution_grid",
    "plot_image_attribution",
    "plot_1d_attribution",
    "plot_volume_slices",
    "to_hwc_numpy",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[Any]]
PathLike = Union[str, "os.PathLike[str]"]

SIGNS = ("all", "positive", "negative", "absolute")
_SIGN_ALIASES = {"absolute_value": "absolute"}  # Captum's name
IMAGE_METHODS = ("heat_map", "blended_heat_map", "original_image")
_DEFAULT_CMAPS = {"all": "RdBu_r", "positive": "Reds", "negative": "Blues_r", "absolute": "inferno"}
_IMAGE_CHANNELS = (1, 3, 4)


# --------------------------------------------------------------------------------------------
# Argument handling
# --------------------------------------------------------------------------------------------


def _to_array(x: Any, name: str) -> np.ndarray:
    """Tensor / array / nested sequence -> float64 numpy array (a copy for tensors)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError(f"{name} must be real-valued, got a tensor of dtype {x.dtype}")
        return x.detach().to("cpu", torch.float64).numpy()
    try:
        arr = np.asarray(x)
    except Exception as err:  # ragged lists and the like
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from err
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(
            f"{name} must be a real-valued tensor or array, got {type(x).__name__} of dtype "
            f"{arr.dtype}"
        )
    return arr.astype(np.float64, copy=False)


def _drop_batch(arr: np.ndarray, max_ndim: int, name: str) -> np.ndarray:
    """Remove leading size-1 dimensions until at most ``max_ndim`` remain."""
    while arr.ndim > max_ndim and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim > max_ndim:
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)}: at most {max_ndim} dimensions are allowed "
            f"after dropping a leading batch dimension of size 1"
        )
    return arr


def _drawable(arr: np.ndarray, name: str) -> np.ndarray:
    """``arr`` itself; a ValueError naming ``name`` if it holds no element."""
    if arr.size == 0:
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)}: every dimension must hold at least one "
            f"element, there is nothing to draw"
        )
    return arr


def _check_fraction(value: Any, name: str, low: float, high: float, low_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value!r} must be a number in {bracket}{low:g}, {high:g}]")
    return float(value)


@dataclass(frozen=True)
class _Style:
    """The checked colour arguments every plot shares.

    They are ``sign``, ``clip_percentile``, ``alpha`` and the colour map (``cmap=None`` resolved to
    the default of ``sign``).

    Build it with :meth:`from_args`, which raises a ValueError naming the bad argument.
    """

    sign: str
    clip_percentile: float
    alpha: float
    cmap: Colormap

    @classmethod
    def from_args(
        cls, sign: Any, clip_percentile: Any, alpha: Any, cmap: Union[None, str, Colormap]
    ) -> _Style:
        sign = _SIGN_ALIASES.get(sign, sign) if isinstance(sign, str) else sign
        if sign not in SIGNS:
            raise ValueError(f"sign={sign!r} must be one of {', '.join(map(repr, SIGNS))}")
        return cls(
            sign=sign,
            clip_percentile=_check_fraction(clip_percentile, "clip_percentile", 0.0, 100.0, True),
            alpha=_check_fraction(alpha, "alpha", 0.0, 1.0, False),
            cmap=_colormap(_DEFAULT_CMAPS[sign] if cmap is None else cmap),
        )

    def scale(self, attr: np.ndarray) -> _Scale:
        """The colour scale of one attribution map drawn in this style."""
        return _Scale(attr, self)


def _check_method(method: str) -> str:
    if method not in IMAGE_METHODS:
        raise ValueError(
            f"method={method!r} must be one of {', '.join(map(repr, IMAGE_METHODS))}; for "
            f"Captum's masked_image / alpha_scaling views call "
            f"captum.attr.visualization.visualize_image_attr on to_hwc_numpy(...) arrays"
        )
    return method


def _channel_axis(shape: Tuple[int, ...], channels_first: bool, name: str) -> Optional[int]:
    """Channel axis of a single 2D image: None for (H, W), 0 for (C, H, W), 2 for (H, W, C)."""
    if len(shape) == 2:
        return None
    if len(shape) != 3:
        raise ValueError(
            f"{name} has shape {shape}: expected an image of shape (H, W), (C, H, W) or "
            f"(H, W, C), optionally with a leading batch dimension of size 1"
        )
    first, last = shape[0] in _IMAGE_CHANNELS, shape[2] in _IMAGE_CHANNELS
    if first and (channels_first or not last):
        return 0
    if last:
        return 2
    raise ValueError(
        f"{name} has shape {shape}: a 3-dimensional image needs 1, 3 or 4 channels first "
        f"(C, H, W) or last (H, W, C)"
    )


def _is_integer(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return np.issubdtype(np.asarray(x).dtype, np.integer)


def _image_for_display(image: Any, name: str = "image") -> np.ndarray:
    """Any supported image -> (H, W) or (H, W, 3) float array in [0, 1]."""
    channels_first = isinstance(image, torch.Tensor)
    integer = _is_integer(image)
    img = _drawable(_drop_batch(_to_array(image, name), 3, name), name)
    axis = _channel_axis(tuple(img.shape), channels_first, name)
    if axis == 0:
        img = np.moveaxis(img, 0, -1)
    if img.ndim == 3:
        img = img[..., 0] if img.shape[-1] == 1 else img[..., :3]  # drop an alpha channel
    return _rescale_01(img, integer)


def _rescale_01(img: np.ndarray, integer: bool = False) -> np.ndarray:
    """Map to [0, 1]: floats in [0, 1] and integers in 0..255 keep their look, others min-max."""
    img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    if img.size == 0:
        return img
    low, high = float(img.min()), float(img.max())
    if integer and low >= 0.0 and high <= 255.0:
        return img / 255.0
    if not integer and low >= 0.0 and high <= 1.0:
        return img
    return _min_max(img)


def _min_max(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _gray(img: np.ndarray) -> np.ndarray:
    return img.mean(axis=-1) if img.ndim == 3 else img


def _attr_map_2d(attr: Any, spatial: Optional[Tuple[int, int]], name: str = "attr") -> np.ndarray:
    """Attribution of one 2D image -> (H, W) map with channels summed."""
    channels_first = isinstance(attr, torch.Tensor)
    arr = _drawable(_drop_batch(_to_array(attr, name), 3, name), name)
    if arr.ndim not in (2, 3):
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)}: expected (H, W), (C, H, W) or (H, W, C), "
            f"optionally with a leading batch dimension of size 1"
        )
    first = arr.ndim == 3 and arr.shape[1:] == spatial
    last = arr.ndim == 3 and arr.shape[:2] == spatial
    if arr.ndim == 2:
        out = arr
    elif first != last:
        out = arr.sum(axis=0 if first else -1)
    elif spatial is not None and not first:
        out = arr  # matches neither layout: reported below
    else:
        out = arr.sum(axis=_channel_axis(tuple(arr.shape), channels_first, name))
    if spatial is not None and out.shape != spatial:
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)}, which does not match the image's spatial "
            f"size {spatial}: expected (H, W), (C, H, W) or (H, W, C) with (H, W) = {spatial}"
        )
    return out


def to_hwc_numpy(x: ArrayLike) -> np.ndarray:
    r"""Convert an image or image attribution to the ``(H, W, C)`` numpy layout Captum plots use.

    Args:
        x (Tensor or numpy.ndarray): Shape ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)``, optionally
            with a leading batch dimension of size 1. 3-dimensional tensors are read as
            channels-first (PyTorch's layout), arrays as channels-last, when the shape allows
            both.

    Returns:
        numpy.ndarray: float64 array of shape ``(H, W, C)`` (``C = 1`` for 2D input).

    Example::

        >>> from captum.attr import visualization as viz
        >>> viz.visualize_image_attr(to_hwc_numpy(attr), to_hwc_numpy(image),
        ...                          method="masked_image", sign="positive")
    """
    channels_first = isinstance(x, torch.Tensor)
    arr = _drop_batch(_to_array(x, "x"), 3, "x")
    axis = _channel_axis(tuple(arr.shape), channels_first, "x")
    if axis is None:
        return arr[..., None]
    return np.moveaxis(arr, 0, -1) if axis == 0 else arr


# --------------------------------------------------------------------------------------------
# Colour scales
# --------------------------------------------------------------------------------------------


class _Scale:
    """Signed view of an attribution and the colour scale that draws it."""

    def __init__(self, attr: np.ndarray, style: _Style) -> None:
        sign = style.sign
        if sign == "positive":
            values = np.maximum(attr, 0.0)
        elif sign == "negative":
            values = np.minimum(attr, 0.0)
        elif sign == "absolute":
            values = np.abs(attr)
        else:
            values = attr
        magnitude = np.abs(values[np.isfinite(values)])
        limit = float(np.percentile(magnitude, style.clip_percentile)) if magnitude.size else 0.0
        if limit <= 0.0:
            limit = float(magnitude.max()) if magnitude.size else 0.0
        if limit <= 0.0:
            limit = 1.0  # an all-zero map: any positive limit draws it neutral
        self.clipped = bool(magnitude.size and magnitude.max() > limit)
        nan, inf = np.isnan(values), np.isinf(values)
        if nan.any() or inf.any():
            _warn_not_finite(int(nan.sum()), int(inf.sum()), values.size, magnitude.size)
            # +-Inf at the ends of the scale: left in, matplotlib's resampling turns the whole
            # panel into NaN and draws it blank.
            values = np.where(inf, np.sign(values) * limit, values)
            self.clipped = self.clipped or bool(inf.any())
        self.values = values
        self.limit = limit
        self.sign = sign
        self.alpha = style.alpha
        low = -limit if sign in ("all", "negative") else 0.0
        high = 0.0 if sign == "negative" else limit
        self.low, self.high = low, high
        self.norm = Normalize(vmin=low, vmax=high, clip=True)
        self.cmap = style.cmap

    def mappable(self) -> ScalarMappable:
        return ScalarMappable(norm=self.norm, cmap=self.cmap)

    def extend(self) -> str:
        if not self.clipped:
            return "neither"
        return {"all": "both", "negative": "min"}.get(self.sign, "max")

    def rgba(self, values: Optional[np.ndarray] = None) -> np.ndarray:
        """Colours whose opacity grows with the magnitude, so small values let the image show."""
        values = self.values if values is None else values
        finite = np.nan_to_num(values, nan=0.0)
        rgba = self.cmap(self.norm(finite))
        strength = np.minimum(np.abs(finite), self.limit) / self.limit  # no overflow at +-Inf
        rgba[..., 3] = self.alpha * strength
        rgba[~np.isfinite(values), 3] = 0.0
        return rgba


def _warn_not_finite(nans: int, infs: int, total: int, finite: int) -> None:
    if finite == 0 and infs == 0:
        what = "it has no finite value, so the panel shows no attribution"
    else:
        drawn = (["NaN is drawn transparent"] if nans else []) + (
            ["+-Inf at the ends of the colour scale"] if infs else []
        )
        what = ", ".join(drawn)
    warnings.warn(
        f"the attribution map holds {nans} NaN and {infs} Inf value(s) of {total}: {what}; "
        "check the attribution (a NaN or Inf baseline, input or model output shows up here)",
        RuntimeWarning,
        stacklevel=5,
    )


def _colormap(cmap: Union[str, Colormap]) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    if isinstance(cmap, str) and cmap in colormaps:
        return colormaps[cmap]
    raise ValueError(f"cmap={cmap!r} must be a matplotlib Colormap or the name of one")


def _colorbar(fig: Figure, scale: _Scale, ax: Any, **kwargs: Any) -> Any:
    cbar = fig.colorbar(scale.mappable(), ax=ax, extend=scale.extend(), **kwargs)
    cbar.ax.tick_params(labelsize=7)
    return cbar


def _clean_axis(ax: Axes) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _root_figure(ax: Axes) -> Figure:
    """The Figure an Axes belongs to, also when it sits in a SubFigure."""
    fig: Any = ax.figure
    root = getattr(fig, "figure", None)  # a SubFigure's root figure
    return root if isinstance(root, Figure) else fig


def _finish(fig: Figure, save_path: Optional[PathLike], dpi: Optional[float] = None) -> Figure:
    """Save the figure if asked (creating missing parent folders) and return it."""
    if save_path is not None:
        try:
            path = os.fspath(save_path)
        except TypeError as err:
            raise TypeError(
                f"save_path must be a str or os.PathLike, got {type(save_path).__name__}"
            ) from err
        name = os.path.basename(path)
        if not name or name in (".", "..") or os.path.isdir(path):
            raise ValueError(
                f"save_path={path!r} names a folder, not a file: give a file name such as "
                f"{os.path.join(path, 'attribution.png')!r}"
            )
        folder = os.path.dirname(path)
        if folder:
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as err:
                raise ValueError(
                    f"save_path={path!r}: cannot create its folder {folder!r} ({err.strerror})"
                ) from err
        fig.savefig(path, dpi=dpi or fig.dpi, bbox_inches="tight")
    return fig


def _draw_image(ax: Axes, image: np.ndarray) -> None:
    """The ``"original_image"`` panel: the (H, W) or (H, W, 3) image in [0, 1]."""
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    _clean_axis(ax)


def _draw_heat_map(ax: Axes, scale: _Scale, values: Optional[np.ndarray] = None) -> None:
    """The ``"heat_map"`` panel: the map alone (``values`` defaults to the scale's own)."""
    values = scale.values if values is None else values
    ax.imshow(values, cmap=scale.cmap, norm=scale.norm, interpolation="nearest")
    _clean_axis(ax)


def _draw_blended(
    ax: Axes, image: np.ndarray, scale: _Scale, values: Optional[np.ndarray] = None
) -> None:
    """The ``"blended_heat_map"`` panel: the map over a grey version of the image."""
    ax.imshow(_gray(image), cmap="gray", vmin=0.0, vmax=1.0)
    ax.imshow(scale.rgba(values), interpolation="nearest")
    _clean_axis(ax)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def plot_attribution(
    attr: ArrayLike,
    image: Optional[ArrayLike] = None,
    *,
    method: str = "blended_heat_map",
    sign: str = "all",
    clip_percentile: float = 99.0,
    cmap: Union[None, str, Colormap] = None,
    alpha: float = 0.7,
    colorbar: bool = True,
    title: Optional[str] = None,
    ax: Optional[Axes] = None,
    figsize: Tuple[float, float] = (4.0, 3.6),
    save_path: Optional[PathLike] = None,
) -> Figure:
    r"""Draw one image attribution in one panel.

    Args:
        attr (Tensor or numpy.ndarray): Attribution of shape ``(H, W)``, ``(C, H, W)`` or
            ``(H, W, C)``, optionally with a leading batch dimension of size 1 (the output of
            ``attribute`` for one image). Channels are summed.
        image (Tensor or numpy.ndarray, optional): The image, in the same layouts with 1, 3 or 4
            channels (a 4th channel is dropped). Floats in [0, 1] and integers in 0..255 are
            shown as they are; any other range (e.g. a normalised model input) is min-max
            rescaled. Required
            unless ``method="heat_map"``. 3-dimensional tensors are read channels-first and
            arrays channels-last when the shape allows both. Default: None
        method (str, optional): ``"blended_heat_map"`` (the map over a grey version of the image,
            opacity growing with the magnitude), ``"heat_map"`` (the map alone) or
            ``"original_image"``. Default: ``"blended_heat_map"``
        sign (str, optional): Which attributions to show: ``"all"`` (a diverging colour map
            centred on zero), ``"positive"``, ``"negative"`` or ``"absolute"`` (Captum's
            ``"absolute_value"`` is accepted too). Default: ``"all"``
        clip_percentile (float, optional): The colour scale ends at this percentile of the
            absolute values shown; larger values are drawn at the end colour (the colour bar
            gets an arrow). Use 100 for the maximum. Default: 99.0
        cmap (str or Colormap, optional): Colour map. Default: ``"RdBu_r"`` for ``"all"`` (red for
            positive), ``"Reds"``, ``"Blues_r"`` and ``"inferno"`` for the others.
        alpha (float, optional): Opacity of the strongest attributions in the blended view, in
            [0, 1]. Default: 0.7
        colorbar (bool, optional): Add a colour bar in attribution units. Default: True
        title (str, optional): Panel title. Default: None
        ax (matplotlib.axes.Axes, optional): Axes to draw into; a new figure is made if None.
            Default: None
        figsize (tuple of float, optional): Size of a new figure, in inches. Default: (4.0, 3.6)
        save_path (str or PathLike, optional): If given, the figure is saved there (the format
            follows the extension; missing folders are created). Default: None

    Returns:
        matplotlib.figure.Figure: The figure drawn into.

    Example::

        >>> attr = TiledOcclusion(model).attribute(x, target=281, window=32, k=4)
        >>> fig = plot_attribution(attr, x, title="tabby", save_path="tabby.png")
    """
    method = _check_method(method)
    colours = _Style.from_args(sign, clip_percentile, alpha, cmap)
    if image is None and method != "heat_map":
        raise ValueError(f"image is required for method={method!r}; only 'heat_map' draws without")
    img = _image_for_display(image) if image is not None else None
    spatial = tuple(img.shape[:2]) if img is not None else None
    scale = colours.scale(_attr_map_2d(attr, spatial))
    if ax is None:
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = _root_figure(ax)
    if method == "heat_map":
        _draw_heat_map(ax, scale)
    elif img is not None:  # checked above: the other views need the image
        if method == "original_image":
            _draw_image(ax, img)
        else:
            _draw_blended(ax, img, scale)
    if colorbar and method != "original_image":
        _colorbar(fig, scale, ax, fraction=0.046, pad=0.03)
    if title:
        ax.set_title(title, fontsize=10)
    return _finish(fig, save_path)


def plot_image_attribution(
    image: ArrayLike,
    attr: ArrayLike,
    *,
    sign: str = "all",
    clip_percentile: float = 99.0,
    cmap: Union[None, str, Colormap] = None,
    alpha: float = 0.7,
    titles: Sequence[str] = ("Image", "Attribution", "Overlay"),
    title: Optional[str] = None,
    axes: Optional[Sequence[Axes]] = None,
    figsize: Tuple[float, float] = (10.0, 3.4),
    save_path: Optional[PathLike] = None,
) -> Figure:
    r"""The three-panel view: the image, the attribution map with a colour bar, and the overlay.

    Args:
        image (Tensor or numpy.ndarray): Shape ``(H, W)``, ``(C, H, W)`` or ``(H, W, C)`` with 1, 3
            or 4 channels, optionally with a leading batch dimension of size 1. Floats in [0, 1]
            and integers in 0..255 are shown as they are; other ranges (a normalised model
            input) are min-max rescaled.
        attr (Tensor or numpy.ndarray): Attribution for ``image``, same spatial size, any of the
            same layouts; channels are summed.
        sign (str, optional): ``"all"``, ``"positive"``, ``"negative"`` or ``"absolute"``; see
            :func:`plot_attribution`. Default: ``"all"``
        clip_percentile (float, optional): Percentile of the absolute values where the colour
            scale ends. Default: 99.0
        cmap (str or Colormap, optional): Colour map; default depends on ``sign`` (diverging
            ``"RdBu_r"`` for ``"all"``). Default: None
        alpha (float, optional): Opacity of the strongest attributions in the overlay.
            Default: 0.7
        titles (sequence of 3 str, optional): Panel titles. Default: ``("Image", "Attribution",
            "Overlay")``
        title (str, optional): Title above the three panels. Default: None
        axes (sequence of 3 Axes, optional): Axes to draw into; a new figure is made if None.
            Default: None
        figsize (tuple of float, optional): Size of a new figure in inches. Default: (10.0, 3.4)
        save_path (str or PathLike, optional): Where to save the figure; missing folders
            are created. Default: None

    Returns:
        matplotlib.figure.Figure: The figure drawn into.

    Example::

        >>> attr = Occlusion(model).attribute(x, target=281, sliding_window_shapes=(3, 32, 32),
        ...                                   strides=(3, 32, 32))
        >>> plot_image_attribution(x, attr, save_path="occlusion.png")
    """
    colours = _Style.from_args(sign, clip_percentile, alpha, cmap)
    titles = list(titles)
    if len(titles) != 3:
        raise ValueError(f"titles must hold 3 strings (one per panel), got {len(titles)}")
    img = _image_for_display(image)
    scale = colours.scale(_attr_map_2d(attr, tuple(img.shape[:2])))
    if axes is None:
        fig = Figure(figsize=figsize, layout="constrained")
        axes = fig.subplots(1, 3)
    else:
        axes = list(axes)
        if len(axes) != 3:
            raise ValueError(f"axes must hold 3 Axes (one per panel), got {len(axes)}")
        fig = _root_figure(axes[0])
    _draw_image(axes[0], img)
    _draw_heat_map(axes[1], scale)
    _draw_blended(axes[2], img, scale)
    for ax, panel_title in zip(axes, titles):
        if panel_title:
            ax.set_title(panel_title, fontsize=10)
    _colorbar(fig, scale, axes[1], fraction=0.046, pad=0.03)
    if title:
        fig.suptitle(title)
    return _finish(fig, save_path)


def _per_image(values: Any, count: Optional[int], name: str) -> List[Any]:
    """Split a batch tensor / array or a list into per-image items.

    Tensors and arrays: 4 dimensions are a batch ``(N, ...)``, 3 a batch of ``N`` single-channel
    images (or one ``(C, H, W)`` map when one image is expected), 2 one image.
    """
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim == 2 or (values.ndim == 3 and count == 1 and values.shape[0] != 1):
            items = [values]
        elif values.ndim in (3, 4):
            items = list(values)
        else:
            raise ValueError(
                f"{name} has shape {tuple(values.shape)}: expected a batch (N, C, H, W), "
                f"(N, H, W, C) or (N, H, W), or a list of images"
            )
    elif isinstance(values, (list, tuple)):
        items = list(values)
    else:
        raise TypeError(
            f"{name} must be a batch tensor / array or a list of images, got "
            f"{type(values).__name__}"
        )
    if not items:
        raise ValueError(f"{name} must hold at least one image")
    if count is not None and len(items) != count:
        raise ValueError(f"{name} holds {len(items)} maps, expected {count} (one per image)")
    return items


def plot_attribution_grid(
    images: Union[ArrayLike, Sequence[ArrayLike]],
    attributions: Mapping[str, Union[ArrayLike, Sequence[ArrayLike]]],
    *,
    method: str = "blended_heat_map",
    sign: str = "all",
    clip_percentile: float = 99.0,
    cmap: Union[None, str, Colormap] = None,
    alpha: float = 0.7,
    show_image: bool = True,
    row_titles: Optional[Sequence[str]] = None,
    image_title: str = "Image",
    colorbar: bool = False,
    title: Optional[str] = None,
    panel_size: float = 2.4,
    save_path: Optional[PathLike] = None,
    dpi: Optional[float] = None,
) -> Figure:
    r"""Compare several attribution methods on several images: rows are images, columns methods.

    Each panel has its own colour scale (methods differ in units), ending at the
    ``clip_percentile``-th percentile of that panel's absolute values.

    Args:
        images (Tensor, numpy.ndarray or list): A batch of shape ``(N, C, H, W)`` /
            ``(N, H, W, C)`` / ``(N, H, W)``, or a list of ``N`` images in the layouts of
            :func:`plot_attribution`.
        attributions (dict): Maps a column title (the method's name) to its attributions for the
            ``N`` images: a batch tensor with ``N`` rows, or a list of ``N`` maps. Columns keep
            the dict's order.
        method (str, optional): ``"blended_heat_map"`` or ``"heat_map"``. Default:
            ``"blended_heat_map"``
        sign (str, optional): ``"all"``, ``"positive"``, ``"negative"`` or ``"absolute"``.
            Default: ``"all"``
        clip_percentile (float, optional): Percentile of the absolute values where each panel's
            colour scale ends. Default: 99.0
        cmap (str or Colormap, optional): Colour map; default depends on ``sign``. Default: None
        alpha (float, optional): Opacity of the strongest attributions in blended panels.
            Default: 0.7
        show_image (bool, optional): Add a first column with the images. Default: True
        row_titles (sequence of str, optional): One label per image, shown left of each row.
            Default: None
        image_title (str, optional): Title of the image column. Default: ``"Image"``
        colorbar (bool, optional): Add a small colour bar to every attribution panel.
            Default: False
        title (str, optional): Figure title. Default: None
        panel_size (float, optional): Width and height of one panel in inches. Default: 2.4
        save_path (str or PathLike, optional): Where to save the figure; missing folders
            are created. Default: None
        dpi (float, optional): Resolution of the saved file; the figure's (100) if None.
            Default: None

    Returns:
        matplotlib.figure.Figure: The new figure.

    Example::

        >>> maps = {"Occlusion": occ, "TiledOcclusion k=4": tiled, "Saliency": sal}
        >>> plot_attribution_grid(x, maps, row_titles=["tabby", "espresso"],
        ...                       save_path="compare.png")
    """
    if method not in ("blended_heat_map", "heat_map"):
        raise ValueError(f"method={method!r} must be 'blended_heat_map' or 'heat_map'")
    blended = method == "blended_heat_map"
    colours = _Style.from_args(sign, clip_percentile, alpha, cmap)
    panel_size = _check_fraction(panel_size, "panel_size", 0.0, 100.0, True)
    if not isinstance(attributions, Mapping):
        raise TypeError(
            f"attributions must be a dict mapping method names to attributions, got "
            f"{type(attributions).__name__}"
        )
    if not attributions and not show_image:
        raise ValueError("attributions is empty and show_image=False: nothing to draw")
    image_list = [
        _image_for_display(img, f"images[{i}]")
        for i, img in enumerate(_per_image(images, None, "images"))
    ]
    count = len(image_list)
    columns: Dict[str, List[_Scale]] = {}
    for name, maps in attributions.items():
        maps = _per_image(maps, count, f"attributions[{name!r}]")
        columns[str(name)] = [
            colours.scale(_attr_map_2d(m, tuple(img.shape[:2]), f"attributions[{name!r}][{i}]"))
            for i, (m, img) in enumerate(zip(maps, image_list))
        ]
    if row_titles is not None:
        row_titles = [str(t) for t in row_titles]
        if len(row_titles) != count:
            raise ValueError(f"row_titles holds {len(row_titles)} labels, expected {count}")
    n_cols = len(columns) + int(show_image)
    width = panel_size * n_cols * (1.25 if colorbar else 1.0)
    fig = Figure(
        figsize=(width, panel_size * count + (0.4 if title else 0.0)), layout="constrained"
    )
    axes = np.asarray(fig.subplots(count, n_cols, squeeze=False))
    for row, img in enumerate(image_list):
        col = 0
        if show_image:
            _draw_image(axes[row, 0], img)
            col = 1
        for name, scales in columns.items():
            ax = axes[row, col]
            if blended:
                _draw_blended(ax, img, scales[row])
            else:
                _draw_heat_map(ax, scales[row])
            if colorbar:
                _colorbar(fig, scales[row], ax, fraction=0.046, pad=0.03)
            if row == 0:
                ax.set_title(name, fontsize=9)
            col += 1
        if row_titles is not None:
            axes[row, 0].set_ylabel(row_titles[row], fontsize=9)
    if show_image:
        axes[0, 0].set_title(image_title, fontsize=9)
    if title:
        fig.suptitle(title)
    return _finish(fig, save_path, dpi)


# --------------------------------------------------------------------------------------------
# 1D signals
# --------------------------------------------------------------------------------------------


def _signal_channels(x: Any, channels_last: bool, name: str) -> np.ndarray:
    """(L,), (C, L), (L, C) (channels_last) or with a batch dim of 1 -> (C, L)."""
    arr = _drawable(_drop_batch(_to_array(x, name), 2, name), name)
    if arr.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension (the sequence), got a scalar")
    if arr.ndim == 1:
        arr = arr[None]
    elif channels_last:
        arr = arr.T
    if arr.shape[1] < 2:
        raise ValueError(
            f"{name} has {arr.shape[1]} step(s) per channel (read as (C, L) = {arr.shape}, "
            f"channels_last={channels_last}): a sequence needs at least 2 steps"
        )
    return arr


def _finite_range(values: np.ndarray) -> Tuple[float, float]:
    """Smallest and largest finite value; ``(0, 0)`` when there is none (all NaN or Inf)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 0.0
    return float(finite.min()), float(finite.max())


def _edges(x: np.ndarray) -> np.ndarray:
    mid = (x[1:] + x[:-1]) / 2.0
    return np.concatenate([[2 * x[0] - mid[0]], mid, [2 * x[-1] - mid[-1]]])


def plot_1d_attribution(
    signal: ArrayLike,
    attr: ArrayLike,
    *,
    x: Optional[ArrayLike] = None,
    style: str = "band",
    sign: str = "all",
    clip_percentile: float = 99.0,
    cmap: Union[None, str, Colormap] = None,
    alpha: float = 0.8,
    channels_last: bool = False,
    channel_labels: Optional[Sequence[str]] = None,
    colorbar: bool = True,
    title: Optional[str] = None,
    ax: Union[None, Axes, Sequence[Axes]] = None,
    figsize: Optional[Tuple[float, float]] = None,
    save_path: Optional[PathLike] = None,
) -> Figure:
    r"""Plot a time series or sequence with its attribution, one panel per channel.

    Args:
        signal (Tensor or numpy.ndarray): Shape ``(L,)`` or ``(C, L)`` (PyTorch's ``Conv1d``
            layout), or ``(L, C)`` with ``channels_last=True``; a leading batch dimension of size
            1 is dropped.
        attr (Tensor or numpy.ndarray): Attribution of the same shape, or ``(L,)`` (one value per
            step, drawn in every channel's panel).
        x (Tensor or numpy.ndarray, optional): Increasing positions of the ``L`` steps (e.g.
            times). Default: ``0 .. L-1``
        style (str, optional): ``"band"`` colours the background of each step by its
            attribution (opacity growing with the magnitude); ``"twin"`` draws the attribution as
            a filled curve on a second y axis (red above zero, blue below), the axis ending at the
            clip value. Default: ``"band"``
        sign (str, optional): ``"all"``, ``"positive"``, ``"negative"`` or ``"absolute"``.
            Default: ``"all"``
        clip_percentile (float, optional): Percentile of the absolute values where the colour
            scale (or the twin axis) ends; one scale for all channels. Default: 99.0
        cmap (str or Colormap, optional): Colour map of the band; default depends on ``sign``.
            Default: None
        alpha (float, optional): Opacity of the strongest attributions. Default: 0.8
        channels_last (bool, optional): Read 2D inputs as ``(L, C)``. Default: False
        channel_labels (sequence of str, optional): One y label per channel. Default: None
        colorbar (bool, optional): Add a colour bar (``"band"`` style). Default: True
        title (str, optional): Title above the first panel. Default: None
        ax (Axes or sequence of Axes, optional): One Axes per channel to draw into; a new figure
            is made if None. Default: None
        figsize (tuple of float, optional): Size of a new figure; ``(8, 1.6 * C + 0.6)`` if None.
            Default: None
        save_path (str or PathLike, optional): Where to save the figure; missing folders
            are created. Default: None

    Returns:
        matplotlib.figure.Figure: The figure drawn into.

    Example::

        >>> attr = TiledOcclusion(model).attribute(ecg, target=1, window=(1, 64), k=(1, 8))
        >>> plot_1d_attribution(ecg[0], attr[0], channel_labels=["lead I"], save_path="ecg.png")
    """
    if style not in ("band", "twin"):
        raise ValueError(f"style={style!r} must be 'band' or 'twin'")
    colours = _Style.from_args(sign, clip_percentile, alpha, cmap)
    sig = _signal_channels(signal, channels_last, "signal")
    n_channels, length = sig.shape
    att = _signal_channels(attr, channels_last, "attr")
    if att.shape[1] != length or att.shape[0] not in (1, n_channels):
        raise ValueError(
            f"attr has {att.shape[0]} channel(s) of length {att.shape[1]}; expected the signal's "
            f"{n_channels} channel(s) of length {length}, or a single (L,) attribution"
        )
    att = np.broadcast_to(att, sig.shape)
    if x is None:
        xs = np.arange(length, dtype=np.float64)
    else:
        xs = _to_array(x, "x").reshape(-1)
        if xs.shape[0] != length or not np.all(np.diff(xs) > 0):
            raise ValueError(
                f"x must hold {length} strictly increasing positions (one per step), got shape "
                f"{tuple(xs.shape)}"
            )
    if channel_labels is not None:
        channel_labels = [str(c) for c in channel_labels]
        if len(channel_labels) != n_channels:
            raise ValueError(
                f"channel_labels holds {len(channel_labels)} labels, expected {n_channels}"
            )
    scale = colours.scale(att)
    if ax is None:
        fig = Figure(figsize=figsize or (8.0, 1.6 * n_channels + 0.6), layout="constrained")
        axes = list(np.ravel(fig.subplots(n_channels, 1, sharex=True, squeeze=False)))
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        if len(axes) != n_channels:
            raise ValueError(f"ax holds {len(axes)} Axes, expected one per channel ({n_channels})")
        fig = _root_figure(axes[0])
    edges = _edges(xs)
    for c, axis in enumerate(axes):
        axis.plot(xs, sig[c], color="black", linewidth=1.0, zorder=3)
        low, high = _finite_range(sig[c])
        pad = 0.08 * (high - low) if high > low else 1.0
        axis.set_ylim(low - pad, high + pad)
        axis.set_xlim(edges[0], edges[-1])
        if style == "band":
            mesh = axis.pcolormesh(
                edges, [low - pad, high + pad], np.zeros((1, length)), shading="flat", zorder=1
            )
            mesh.set_array(None)
            mesh.set_facecolor(scale.rgba(scale.values[c]).reshape(-1, 4))
            mesh.set_edgecolor("none")
        else:
            twin = axis.twinx()
            vals = np.clip(scale.values[c], -scale.limit, scale.limit)
            twin.fill_between(
                xs,
                0,
                vals,
                where=vals >= 0,
                step="mid",
                color="tab:red",
                alpha=colours.alpha * 0.6,
                linewidth=0,
                interpolate=True,
            )
            twin.fill_between(
                xs,
                0,
                vals,
                where=vals <= 0,
                step="mid",
                color="tab:blue",
                alpha=colours.alpha * 0.6,
                linewidth=0,
                interpolate=True,
            )
            twin.axhline(0.0, color="grey", linewidth=0.5)
            twin.set_ylim(scale.low * 1.05, scale.high * 1.05)
            twin.set_ylabel("attribution", fontsize=8)
            twin.tick_params(labelsize=7)
            axis.set_zorder(twin.get_zorder() + 1)  # the signal above the filled curve
            axis.patch.set_visible(False)
        if channel_labels is not None:
            axis.set_ylabel(channel_labels[c], fontsize=9)
        axis.tick_params(labelsize=8)
    if colorbar and style == "band":
        _colorbar(fig, scale, axes, fraction=0.03, pad=0.02)
    if title:
        axes[0].set_title(title, fontsize=10)
    return _finish(fig, save_path)


# --------------------------------------------------------------------------------------------
# 3D volumes
# --------------------------------------------------------------------------------------------


def _volume(x: Any, channels_last: bool, name: str, reduce: str) -> np.ndarray:
    """(D, H, W), (C, D, H, W) / (D, H, W, C) or with a batch dim of 1 -> (D, H, W)."""
    arr = _drawable(_drop_batch(_to_array(x, name), 4, name), name)
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4:
        axis = -1 if channels_last else 0
        return arr.sum(axis=axis) if reduce == "sum" else arr.mean(axis=axis)
    raise ValueError(
        f"{name} has shape {tuple(arr.shape)}: expected a volume (D, H, W) or "
        f"{'(D, H, W, C)' if channels_last else '(C, D, H, W)'}, optionally with a leading batch "
        f"dimension of size 1"
    )


def plot_volume_slices(
    volume: Optional[ArrayLike],
    attr: ArrayLike,
    *,
    axis: int = 0,
    n_slices: int = 4,
    slices: Optional[Sequence[int]] = None,
    sign: str = "all",
    clip_percentile: float = 99.0,
    cmap: Union[None, str, Colormap] = None,
    alpha: float = 0.7,
    channels_last: bool = False,
    title: Optional[str] = None,
    panel_size: float = 2.2,
    save_path: Optional[PathLike] = None,
) -> Figure:
    r"""Show a 3D attribution as a few slices along one axis.

    The top row shows the attribution of each slice, the bottom row (if ``volume`` is given) the
    slice of the volume in grey with the attribution over it. One colour scale serves all slices,
    computed over the whole volume, so slices can be compared.

    Args:
        volume (Tensor or numpy.ndarray or None): Shape ``(D, H, W)``, ``(C, D, H, W)`` (or
            ``(D, H, W, C)`` with ``channels_last=True``), optionally with a leading batch
            dimension of size 1; channels are averaged and the result min-max scaled for
            display. None draws the attribution row only.
        attr (Tensor or numpy.ndarray): Attribution of the same layout (channels are summed) or
            ``(D, H, W)``.
        axis (int, optional): Spatial axis to slice along: 0, 1 or 2 (or -3..-1) of
            ``(D, H, W)``. Default: 0
        n_slices (int, optional): Number of evenly spaced interior slices, used when ``slices``
            is None. Default: 4
        slices (sequence of int, optional): Explicit slice indices along ``axis``. Default: None
        sign (str, optional): ``"all"``, ``"positive"``, ``"negative"`` or ``"absolute"``.
            Default: ``"all"``
        clip_percentile (float, optional): Percentile of the absolute values (whole volume)
            where the colour scale ends. Default: 99.0
        cmap (str or Colormap, optional): Colour map; default depends on ``sign``. Default: None
        alpha (float, optional): Opacity of the strongest attributions in the overlay row.
            Default: 0.7
        channels_last (bool, optional): Read 4-dimensional inputs as ``(D, H, W, C)``.
            Default: False
        title (str, optional): Figure title. Default: None
        panel_size (float, optional): Size of one panel in inches. Default: 2.2
        save_path (str or PathLike, optional): Where to save the figure; missing folders
            are created. Default: None

    Returns:
        matplotlib.figure.Figure: The new figure.

    Example::

        >>> attr = TiledOcclusion(model).attribute(ct, target=1, window=(1, 16, 16, 16), k=2)
        >>> plot_volume_slices(ct[0], attr[0], axis=0, n_slices=5, save_path="ct.png")
    """
    colours = _Style.from_args(sign, clip_percentile, alpha, cmap)
    panel_size = _check_fraction(panel_size, "panel_size", 0.0, 100.0, True)
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -3 <= axis <= 2:
        raise ValueError(f"axis={axis!r} must be 0, 1 or 2 (or -3..-1), a dimension of (D, H, W)")
    axis = int(axis) % 3
    att = _volume(attr, channels_last, "attr", "sum")
    vol = None
    if volume is not None:
        vol = _volume(volume, channels_last, "volume", "mean")
        if vol.shape != att.shape:
            raise ValueError(
                f"attr's volume shape {tuple(att.shape)} does not match volume's {tuple(vol.shape)}"
            )
        vol = _min_max(vol)
    depth = att.shape[axis]
    if slices is None:
        if (
            isinstance(n_slices, bool)
            or not isinstance(n_slices, (int, np.integer))
            or (n_slices < 1)
        ):
            raise ValueError(f"n_slices={n_slices!r} must be a positive int")
        count = min(int(n_slices), depth)
        picks = np.linspace(0, depth - 1, count + 2)[1:-1] if depth > count else np.arange(depth)
        slice_ids = sorted({int(round(p)) for p in picks})
    else:
        slice_ids = [int(s) for s in slices]
        bad = [s for s in slice_ids if not -depth <= s < depth]
        if not slice_ids or bad:
            raise ValueError(
                f"slices={list(slices)!r} must be a non-empty list of indices in "
                f"[{-depth}, {depth}) along axis {axis} (size {depth})"
            )
        slice_ids = [s % depth for s in slice_ids]
    scale = colours.scale(att)
    n_rows = 1 if vol is None else 2
    fig = Figure(
        figsize=(panel_size * len(slice_ids) + 0.8, panel_size * n_rows + (0.4 if title else 0.0)),
        layout="constrained",
    )
    axes = np.asarray(fig.subplots(n_rows, len(slice_ids), squeeze=False))
    dim_name = "DHW"[axis]
    for col, index in enumerate(slice_ids):
        values = np.take(scale.values, index, axis=axis)
        _draw_heat_map(axes[0, col], scale, values)
        axes[0, col].set_title(f"{dim_name} = {index}", fontsize=9)
        if vol is not None:
            _draw_blended(axes[1, col], np.take(vol, index, axis=axis), scale, values)
    axes[0, 0].set_ylabel("attribution", fontsize=9)
    if vol is not None:
        axes[1, 0].set_ylabel("overlay", fontsize=9)
    _colorbar(fig, scale, list(axes.ravel()), fraction=0.03, pad=0.02)
    if title:
        fig.suptitle(title)
    return _finish(fig, save_path)
