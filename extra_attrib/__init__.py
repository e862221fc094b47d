"""extra_attrib: attribution methods for Captum.

Public API:

- :class:`TiledOcclusion` -- occlusion with large windows placed at a fine stride.
- :class:`FusionGrad` -- NoiseGrad + SmoothGrad around any Captum attribution method.
- ``plot_*`` -- matplotlib views of image, 1D and volume attributions.
- :func:`explain_dataset`, :func:`open_attributions` -- a whole dataset into a resumable zarr
  store, in one or several processes (needs the ``scale`` extra).
- :mod:`extra_attrib.scores` -- ready-made ``score=`` callables for classification (multi-label),
  segmentation, detection and regression models.
"""

from extra_attrib import scores
from extra_attrib.dataset import explain_dataset, open_attributions
from extra_attrib.fusion_grad import FusionGrad
from extra_attrib.tiled_occlusion import TiledOcclusion
from extra_attrib.visualization import (
    plot_1d_attribution,
    plot_attribution,
    plot_attribution_grid,
    plot_image_attribution,
    plot_volume_slices,
)

__version__ = "0.1.0"

__all__ = [
    "FusionGrad",
    "TiledOcclusion",
    "__version__",
    "explain_dataset",
    "open_attributions",
    "plot_1d_attribution",
    "plot_attribution",
    "plot_attribution_grid",
    "plot_image_attribution",
    "plot_volume_slices",
    "scores",
]
