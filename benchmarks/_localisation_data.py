"""Composites and localisation metrics for :mod:`benchmarks.localisation`.

A composite is a real object cut from a real photo and pasted, at a known position and size, onto
a real background. The cut-outs are hand-specified rectangles around the object in each source
photo (see :data:`OBJECTS`): a rectangle holds the object and a little of the photo's own
background, and the pasted rectangle is the ground-truth box. Backgrounds are random crops of the
textures and scenes that scikit-image ships. Everything comes from explicit seeds.

The metrics take maps of shape ``(H, W)`` (channels already summed) and a boolean box mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from extra_attrib import imagenet

SIDE = imagenet.INPUT_SIZE  # 224


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """A cut-out: ``box = (top, bottom, left, right)`` in the source photo's pixels."""

    name: str
    source: str  # "skimage:<name>" or "sklearn:<file name>"
    box: Tuple[int, int, int, int]
    classes: Tuple[int, ...]  # ImageNet classes that count as "the object"


# Photos shipped offline by scikit-image or scikit-learn with an object EfficientNet-Lite0
# recognises (its top-1 class on the cut-out is one of the object's classes): boxes drawn by hand
# around the object. A class set names one object only: the cat counts as any of the three ImageNet
# cat classes the model splits it between; the motorcycle (no ImageNet class of its own) as moped
# or motor scooter, the two motorised two-wheelers; the cup of espresso as espresso or cup; the
# Summer Palace's Tower of Buddhist Incense (a temple building inside the palace) as palace or
# monastery; the toy space shuttle in the astronaut photo as space shuttle. Neighbouring classes
# that name other objects (coffee mug, bell cote, stupa, castle, go-kart, tricycle) do not count.
OBJECTS: Tuple[ObjectSpec, ...] = (
    ObjectSpec("cat", "skimage:chelsea", (0, 300, 80, 380), (281, 282, 285)),
    ObjectSpec("espresso", "skimage:coffee", (0, 400, 100, 500), (967, 968)),
    ObjectSpec("tripod", "skimage:camera", (140, 500, 150, 480), (872,)),
    ObjectSpec("moped", "skimage:stereo_motorcycle", (160, 490, 80, 690), (665, 670)),
    ObjectSpec("palace", "sklearn:china.jpg", (15, 427, 70, 360), (698, 663)),
    ObjectSpec("daisy", "sklearn:flower.jpg", (120, 420, 150, 450), (985,)),
    ObjectSpec("shuttle", "skimage:astronaut", (0, 240, 340, 480), (812,)),
)

# Textures and scenes without any of those objects (scikit-image, offline); a photo that gives an
# object (astronaut: the shuttle) is not a background.
BACKGROUNDS: Tuple[str, ...] = (
    "brick",
    "grass",
    "gravel",
    "moon",
    "coins",
    "page",
    "text",
    "cell",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
)

# Longer side of the pasted object: 1/8, 1/4, 3/8 and 1/2 of the image side.
SCALES: Tuple[int, ...] = (28, 56, 84, 112)


def load_source(source: str) -> np.ndarray:
    """A source photo as ``(H, W, 3)`` uint8."""
    kind, name = source.split(":", 1)
    if kind == "skimage":
        import skimage.data

        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo pair: left view
            img = img[0]
    elif kind == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(name)
    else:
        raise ValueError(f"source={source!r} must start with 'skimage:' or 'sklearn:'")
    return imagenet.as_rgb_uint8(np.asarray(img), name)


def _to_unit(img: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0


def _resize(x: Tensor, height: int, width: int) -> Tensor:
    """Antialiased bicubic resize of ``(3, H, W)`` to ``(3, height, width)``, clamped to [0, 1]."""
    out = F.interpolate(
        x[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return out[0].clamp(0.0, 1.0)


@dataclasses.dataclass
class Sources:
    """Object cut-outs and background photos, in [0, 1], ``(3, H, W)``."""

    objects: Dict[str, Tensor]
    backgrounds: Dict[str, Tensor]


def load_sources(
    objects: Sequence[ObjectSpec] = OBJECTS,
    backgrounds: Sequence[str] = BACKGROUNDS,
    loader: Callable[[str], np.ndarray] = load_source,
) -> Sources:
    """Cut the objects out of their photos and load the backgrounds."""
    cut = {}
    for spec in objects:
        img = loader(spec.source)
        top, bottom, left, right = spec.box
        if not (0 <= top < bottom <= img.shape[0] and 0 <= left < right <= img.shape[1]):
            raise ValueError(f"box {spec.box} of {spec.name!r} lies outside {img.shape}")
        cut[spec.name] = _to_unit(img[top:bottom, left:right])
    bgs = {name: _to_unit(loader(f"skimage:{name}")) for name in backgrounds}
    return Sources(cut, bgs)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one composite's object goes: its box is rows ``top:top+h``, columns ``left:left+w``."""

    index: int
    obj: str
    scale: int
    background: str
    bg_box: Tuple[int, int, int]  # top, left, side of the square background crop
    top: int
    left: int
    h: int
    w: int


def make_layout(index: int, sources: Sources, seed: int, side: int = SIDE) -> Layout:
    """The ``index``-th composite's layout: scale and object cycle, the rest is random.

    Scales cycle fastest (``index % 4``), then objects, so indices ``j, j + 4, j + 8, ...`` are
    one scale's stream with every object in turn. The background, its crop and the object's
    position are drawn from ``(seed, index)``; the position is uniform over the pixels (not aligned
    to any occlusion grid).
    """
    names = sorted(sources.objects)
    scale = SCALES[index % len(SCALES)]
    obj = names[(index // len(SCALES)) % len(names)]
    rng = np.random.default_rng([seed, index])
    bg_names = sorted(sources.backgrounds)
    background = bg_names[int(rng.integers(len(bg_names)))]
    bh, bw = sources.backgrounds[background].shape[1:]
    short = min(bh, bw)
    crop = int(rng.integers(max(side, short // 3), short + 1)) if short > side else short
    bg_box = (int(rng.integers(0, bh - crop + 1)), int(rng.integers(0, bw - crop + 1)), crop)
    oh, ow = sources.objects[obj].shape[1:]
    ratio = scale / max(oh, ow)
    h, w = max(1, round(oh * ratio)), max(1, round(ow * ratio))
    top = int(rng.integers(0, side - h + 1))
    left = int(rng.integers(0, side - w + 1))
    return Layout(index, obj, scale, background, bg_box, top, left, h, w)


def balanced_order(kept: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Kept composites in round-robin order over the scales, so that any prefix is balanced."""
    by_scale: Dict[int, List[Dict[str, Any]]] = {}
    for item in sorted(kept, key=lambda r: r["index"]):
        by_scale.setdefault(item["scale"], []).append(item)
    out: List[Dict[str, Any]] = []
    queues = [by_scale[v] for v in sorted(by_scale)]
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def render(layout: Layout, sources: Sources, side: int = SIDE) -> Tuple[Tensor, Tensor]:
    """The composite in [0, 1], ``(3, side, side)``, and its object box, ``(side, side)`` bool."""
    bg = sources.backgrounds[layout.background]
    t, lft, crop = layout.bg_box
    img = _resize(bg[:, t : t + crop, lft : lft + crop], side, side).clone()
    obj = _resize(sources.objects[layout.obj], layout.h, layout.w)
    img[:, layout.top : layout.top + layout.h, layout.left : layout.left + layout.w] = obj
    box = torch.zeros(side, side, dtype=torch.bool)
    box[layout.top : layout.top + layout.h, layout.left : layout.left + layout.w] = True
    return img, box


def to_model_input(unit: Tensor) -> Tensor:
    """``(..., 3, H, W)`` in [0, 1] -> EfficientNet-Lite's input scaling."""
    return (unit * 255.0 - imagenet.MEAN) / imagenet.STD


# --------------------------------------------------------------------------------------------
# Metrics: map (H, W), box (H, W) bool
# --------------------------------------------------------------------------------------------


def _check(a: Tensor, box: Tensor) -> Tensor:
    if a.shape != box.shape or box.dtype != torch.bool:
        raise ValueError(f"map {tuple(a.shape)} and bool box {tuple(box.shape)} must match")
    return a.double()


def pointing(a: Tensor, box: Tensor) -> float:
    """Pointing game: is the maximum inside the box? Ties count fractionally.

    With several elements at the maximum (a blocky map), the result is the share of them inside
    the box: the expected hit when ties are broken at random.
    """
    a = _check(a, box)
    top = a == a.max()
    return float((top & box).sum()) / float(top.sum())


def relevance_mass(a: Tensor, box: Tensor) -> float:
    """Share of the positive relevance that lies inside the box (Arras et al., 2022); 0 if none."""
    pos = _check(a, box).clamp(min=0)
    total = float(pos.sum())
    return float(pos[box].sum()) / total if total > 0 else 0.0


def relevance_rank(a: Tensor, box: Tensor) -> float:
    """Share of the top-``|box|`` elements inside the box; ties at the cut count fractionally."""
    a = _check(a, box)
    k = int(box.sum())
    if k == 0:
        raise ValueError("the box is empty")
    cut = torch.topk(a.flatten(), k).values[-1]
    above = a > cut
    at = a == cut
    need = k - int(above.sum())
    inside = float((above & box).sum()) + need * float((at & box).sum()) / float(at.sum())
    return inside / k


METRICS: Dict[str, Callable[[Tensor, Tensor], float]] = {
    "pointing": pointing,
    "mass": relevance_mass,
    "rank": relevance_rank,
}


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> Tuple[float, float, float, int]:
    """Mean and percentile-bootstrap 95 % interval of the mean: ``(mean, low, high, n)``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), float("nan"), 0
    if n == 1:
        return float(v[0]), float("nan"), float("nan"), 1
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(v.mean()), float(low), float(high), n


def images_for_difference(sd: float, delta: float = 0.03, power_z: float = 0.84) -> int:
    """Images needed so a paired mean difference ``delta`` is detected (two-sided 5 %, 80 %)."""
    if not sd > 0:
        return 0
    return int(np.ceil(((1.96 + power_z) * sd / delta) ** 2))


def select_kept(
    predicted: Sequence[int], layouts: Sequence[Layout], objects: Sequence[ObjectSpec] = OBJECTS
) -> List[Optional[int]]:
    """The target class of each layout if the model predicted one of its object's classes."""
    by_name = {o.name: o for o in objects}
    return [
        int(p) if int(p) in by_name[lay.obj].classes else None for p, lay in zip(predicted, layouts)
    ]
