"""Presso: compress deep-learning work end to end.

This file is the root of the ``presso`` import package; the code lives in the four folders
beside it (``presso.orchestrator``, ``presso.compressors``, ``presso.kernels``, ``presso.jobs``).
It holds only the version and the exception types every layer raises, so importing ``presso``
stays cheap.
"""

__version__ = "0.1.0"


class PressoError(Exception):
    """An error the user can fix. The CLI prints its message (no traceback) and exits non-zero."""

    exit_code = 1


class ConfigError(PressoError):
    """A config key is unknown, has the wrong type, or a value is out of range."""

    exit_code = 2


class DataError(PressoError):
    """The corpus or a model file is missing, empty, or fails its checksum."""


class IntegrityError(PressoError):
    """A checkpoint or artifact is partial, tampered with, or belongs to another model."""


class UnsupportedError(PressoError):
    """A layer, shape or setting that an algorithm cannot handle."""


class ClusterError(PressoError):
    """The Ray cluster does not answer, or cannot offer the resources a stage asks for."""


class StageError(PressoError):
    """A stage failed while running (workers crashed past their restarts); says what was kept."""


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a write that found no space (pyarrow and Ray carry errno 28 only in
    the message)."""
    return getattr(error, "errno", None) == 28 or "No space left on device" in str(error)


def load_compressed(path, *, dtype=None, device="cpu"):
    """Rebuild a runnable model from a packed artifact folder, its uncompressed tensors in
    ``dtype`` (default: as stored) on ``device`` (see ``presso.compressors.formats.loading``)."""
    from presso.compressors.formats.loading import load_compressed as _load

    return _load(path, dtype=dtype, device=device)


def compress(
    model, recipe_or_budget, calibration=None, tokenizer=None, workers=0, output=None, **options
):
    """Compress a Hugging Face causal LM in one call; returns the compressed copy (see
    ``presso.orchestrator.api.compress`` for every argument)::

        small = presso.compress(model, "gptq", calibration=texts, tokenizer=tokenizer)
    """
    from presso.orchestrator.api import compress as _compress

    return _compress(model, recipe_or_budget, calibration, tokenizer, workers, output, **options)


__all__ = [
    "ClusterError",
    "ConfigError",
    "DataError",
    "IntegrityError",
    "PressoError",
    "StageError",
    "UnsupportedError",
    "__version__",
    "compress",
    "disk_full",
    "load_compressed",
]
