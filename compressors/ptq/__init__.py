"""Post-training compression of a decoder model, block by block: recipes, calibration
statistics, the OBS sweep, and the one block loop the in-process and Ray runs share.

    from presso.compressors.ptq import Recipe, compress_model
"""

from presso.compressors.ptq.blocks import compress_model
from presso.compressors.ptq.recipe import Recipe

__all__ = ["Recipe", "compress_model"]
