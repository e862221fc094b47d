"""extra_attrib: attribution methods for Captum.

Public API:

- :class:`TiledOcclusion` -- occlusion with large windows placed at a fine stride.
"""

from extra_attrib.tiled_occlusion import TiledOcclusion

__version__ = "0.1.0"

__all__ = ["TiledOcclusion", "__version__"]
