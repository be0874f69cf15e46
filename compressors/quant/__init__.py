"""Weight quantizers; importing this package registers them by name."""

from presso.compressors.quant import adadim, awq, gptq, rtn, spqr, spqr_format  # noqa: F401
