"""extra_attrib: attribution methods for Captum.

Public API:

- :class:`TiledOcclusion` -- occlusion with large windows placed at a fine stride.
- :class:`FusionGrad` -- NoiseGrad + SmoothGrad around any Captum attribution method.
"""

from extra_attrib.fusion_grad import FusionGrad
from extra_attrib.tiled_occlusion import TiledOcclusion

__version__ = "0.1.0"

__all__ = ["FusionGrad", "TiledOcclusion", "__version__"]
