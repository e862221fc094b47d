"""extra_attrib: attribution methods for Captum.

Public API:

- :class:`TiledOcclusion` -- occlusion with large windows at a fine stride.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
