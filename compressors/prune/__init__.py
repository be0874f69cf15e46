"""Weight pruners and sparse formats; importing this package registers them by name."""

from presso.compressors.prune import formats, magnitude, sparsegpt, wanda  # noqa: F401
