"""Data and models for :mod:`benchmarks.quality`.

Two sources:

- a synthetic localisation task with ground truth: each image is clutter (a smooth random colour
  field, pixel noise and two *distractor* patches of random binary noise) plus one *object* patch of
  stripes whose orientation (0, 45, 90 or 135 degrees) is the label. The object's square is the
  ground-truth mask. A fifth class, "no object", appears in training only, so that the network
  must find every orientation positively instead of learning one as "none of the others". A
  small CNN learns it on CPU in well under a minute.
- the real photos that scikit-image ships offline, for ImageNet-trained EfficientNet-Lite0.

Everything is generated from explicit seeds.
"""

from __future__ import annotations

import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extra_attrib import imagenet
from extra_attrib.evaluation import area_under_curve, perturbation_curve

N_ORIENTATIONS = 4
NO_OBJECT = 4  # label of training images without an object
N_CLASSES = 5
IMAGE_SIZE = 48
PATCH = 12
N_DISTRACTORS = 2
STRIPE_PERIOD = 4.0

# Colour photos bundled with scikit-image (no download needed). ``stereo_motorcycle`` returns a
# stereo pair: only its left view is used, the right one is a near-duplicate.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)


# --------------------------------------------------------------------------------------------
# Synthetic localisation task
# --------------------------------------------------------------------------------------------


def _stripes(label: int, size: int, phase: float) -> np.ndarray:
    """Binary stripe pattern (size, size) with orientation ``label * 45`` degrees."""
    angle = np.deg2rad(45.0 * label)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Direction across the stripes.
    u = xx * np.cos(angle) + yy * np.sin(angle)
    return (np.sin(2 * np.pi * u / STRIPE_PERIOD + phase) > 0).astype(np.float32)


def _place(rng: np.random.Generator, taken: List[Tuple[int, int]], size: int, patch: int):
    """A top-left corner for a patch that does not overlap the patches already ``taken``."""
    for _ in range(1000):
        r, c = rng.integers(0, size - patch + 1, size=2)
        if all(abs(r - r2) >= patch or abs(c - c2) >= patch for r2, c2 in taken):
            return int(r), int(c)
    raise RuntimeError("could not place a patch without overlap")


def _two_colours(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """A dark and a bright random RGB colour, in random order."""
    dark = rng.uniform(0.0, 0.4, size=3).astype(np.float32)
    bright = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
    return (dark, bright) if rng.random() < 0.5 else (bright, dark)


def make_synthetic(
    n: int, seed: int, p_empty: float = 0.0
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Generate the synthetic localisation data set.

    Args:
        n (int): Number of images.
        seed (int): Seed of the generator; the same arguments give the same images.
        p_empty (float, optional): Probability that an image has no object; its label is then
            ``NO_OBJECT``. Training uses some, so that no orientation can be learnt as "none of
            the others". Default: 0.0.

    Returns:
        tuple: ``x`` of shape ``(n, 3, 48, 48)`` in ``[0, 1]`` (float32); ``y`` of shape ``(n,)``
        (int64: the stripe orientation 0..3, or ``NO_OBJECT``); ``masks`` of shape
        ``(n, 1, 48, 48)`` (bool, the object's square); and ``x_removed``, the same images without
        the object (the clutter it covered left in place).
    """
    rng = np.random.default_rng(seed)
    s, p = IMAGE_SIZE, PATCH
    x = np.empty((n, 3, s, s), np.float32)
    x_removed = np.empty((n, 3, s, s), np.float32)
    y = rng.integers(0, N_ORIENTATIONS, size=n)
    y[rng.random(n) < p_empty] = NO_OBJECT
    masks = np.zeros((n, 1, s, s), bool)
    # Smooth colour fields: low-resolution noise, upsampled.
    low = torch.from_numpy(rng.uniform(0.15, 0.85, size=(n, 3, 4, 4)).astype(np.float32))
    fields = F.interpolate(low, size=(s, s), mode="bicubic", align_corners=False).numpy()
    for i in range(n):
        img = fields[i] + rng.normal(0, 0.04, size=(3, s, s)).astype(np.float32)
        taken: List[Tuple[int, int]] = [_place(rng, [], s, p)]
        for _ in range(N_DISTRACTORS):
            rd, cd = _place(rng, taken, s, p)
            taken.append((rd, cd))
            fg, bg = _two_colours(rng)
            # Random binary noise in 2x2 cells: as sharp as the stripes, but without orientation.
            cells = rng.integers(0, 2, size=(p // 2, p // 2)).astype(np.float32)
            noise = np.kron(cells, np.ones((2, 2), np.float32))
            img[:, rd : rd + p, cd : cd + p] = fg[:, None, None] * noise + bg[:, None, None] * (
                1 - noise
            )
        x_removed[i] = img
        fg, bg = _two_colours(rng)
        phase = rng.uniform(0, 2 * np.pi)
        if y[i] != NO_OBJECT:
            r, c = taken[0]
            stripes = _stripes(int(y[i]), p, phase)
            img = img.copy()
            img[:, r : r + p, c : c + p] = fg[:, None, None] * stripes + bg[:, None, None] * (
                1 - stripes
            )
            masks[i, 0, r : r + p, c : c + p] = True
        x[i] = img
    np.clip(x, 0.0, 1.0, out=x)
    np.clip(x_removed, 0.0, 1.0, out=x_removed)
    return (
        torch.from_numpy(x),
        torch.from_numpy(y).long(),
        torch.from_numpy(masks),
        torch.from_numpy(x_removed),
    )


class SmallCNN(nn.Module):
    """Three conv blocks and a global max pool: about 24k parameters."""

    def __init__(self, n_classes: int = N_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        x = torch.amax(x, dim=(2, 3))
        return self.fc(x)


def train_small_cnn(
    x: Tensor, y: Tensor, epochs: int, seed: int, batch_size: int = 64, log=print
) -> SmallCNN:
    """Train :class:`SmallCNN` with Adam and a one-cycle learning rate; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, correct = 0.0, 0
        for b in range(0, len(x), batch_size):
            idx = perm[b : b + batch_size]
            xb, yb = x[idx], y[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
        log(
            f"  epoch {epoch + 1}/{epochs}: loss {total / len(x):.3f}, "
            f"train acc {correct / len(x):.3f} ({time.perf_counter() - t0:.0f} s)"
        )
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)``."""
    correct = 0
    for b in range(0, len(x), batch_size):
        correct += int((model(x[b : b + batch_size]).argmax(1) == y[b : b + batch_size]).sum())
    return correct / len(x)


# --------------------------------------------------------------------------------------------
# Real photos and EfficientNet-Lite0
# --------------------------------------------------------------------------------------------


def load_photos(names: Sequence[str] = PHOTOS) -> Tuple[Tensor, List[str], np.ndarray]:
    """scikit-image's colour photos, preprocessed exactly as the demo does it.

    That is EfficientNet-Lite's own evaluation preprocessing (centre crop of 224/256 of the shorter
    side, resized to 224 x 224, pixels scaled as ``(p - 127) / 128``): see
    :mod:`extra_attrib.imagenet`.

    Returns:
        tuple: ``x`` of shape ``(len(names), 3, 224, 224)`` (float32, about ``[-1, 1]``), the
        names, and the crops for display, ``(len(names), 224, 224, 3)`` in ``[0, 1]``.
    """
    import skimage.data

    xs, shown = [], []
    for name in names:
        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo pair: left view
            img = img[0]
        x, display = imagenet.preprocess(imagenet.as_rgb_uint8(img, name))
        xs.append(x)
        shown.append(display)
    return torch.cat(xs), list(names), np.stack(shown)


def black_value() -> float:
    """The model-input value of a black pixel."""
    return float((0.0 - imagenet.MEAN) / imagenet.STD)


def deletion_insertion(
    model: nn.Module, x: Tensor, maps: Tensor, target: Tensor, n_steps: int, rows: int, seed: int
) -> Dict[str, np.ndarray]:
    """Per-image areas under the deletion (to black) and insertion (from blur) curves of maps."""
    areas = {}
    for mode, baseline in (("deletion", black_value()), ("insertion", "blur")):
        curve = perturbation_curve(
            model,
            x,
            maps,
            target=target,
            mode=mode,
            n_steps=n_steps,
            baseline=baseline,
            batch_size=rows,
            generator=torch.Generator().manual_seed(seed),
        )
        areas[mode] = area_under_curve(curve).numpy()
    return areas
