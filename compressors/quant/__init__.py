"""Weight quantizers; importing this package registers them by name."""

from presso.compressors.quant import rtn  # noqa: F401
