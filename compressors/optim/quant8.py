"""Block-wise 8-bit storage for optimizer moments, in plain torch (CPU and GPU alike).

A tensor is cut into blocks of ``BLOCK`` values; each block keeps its absolute maximum in fp32 and
each value the index (one byte) of the nearest entry of a 256-entry code book over [-1, 1] (or
[0, 1] for non-negative tensors such as Adam's second moment). Storage is 1 + 4/256 bytes a value.

Two code books:
- ``linear``: evenly spaced levels. Worst-case error ``absmax / 254`` a value (``absmax / 510``
  unsigned), but small values in a block with one large value collapse to zero.
- ``dynamic``: a decimal exponent plus a linear fraction whose precision shrinks with the exponent
  (64 levels in (0.1, 1], 32 in (0.01, 0.1], ...). Worst-case error ``0.9 / 128 * absmax`` (in the
  top decade), but values down to ``1e-6 * absmax`` (``1e-7`` unsigned) survive, which is what
  Adam's second moment needs: a zeroed ``v`` under a non-zero ``m`` makes a huge step.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 256
# Blocks quantized at once: bounds the int64 index scratch to a few MB on large tensors.
_CHUNK_BLOCKS = 4096
CODES = ("dynamic", "linear")


def _dynamic_magnitudes(decades: int) -> torch.Tensor:
    """Positive levels: decade ``i`` holds ``2**(decades-1-i)`` evenly spaced values in
    ``(0.1, 1] * 10**-i``, so each smaller decade gives up one bit of fraction."""
    levels = []
    for i in range(decades):
        count = 2 ** (decades - 1 - i)
        levels.append(torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)[1:] * 10.0**-i)
    return torch.cat(levels)


@functools.cache
def _code_book(kind: str, signed: bool) -> torch.Tensor:
    if kind == "linear":
        # Signed: k/127 for k in [-128, 127]; -128/127 lies outside [-1, 1] and is never chosen.
        book = torch.arange(-128, 128) / 127.0 if signed else torch.arange(256) / 255.0
    elif kind == "dynamic":
        if signed:
            # 127 magnitudes per sign, zero, and one spare code spent on a finer smallest level.
            pos = torch.cat([_dynamic_magnitudes(7), torch.tensor([1e-7], dtype=torch.float64)])
            book = torch.cat([-_dynamic_magnitudes(7), torch.zeros(1, dtype=torch.float64), pos])
        else:
            book = torch.cat([torch.zeros(1, dtype=torch.float64), _dynamic_magnitudes(8)])
    else:
        raise ValueError(f"unknown 8-bit code {kind!r}; expected one of {CODES}")
    book = book.to(torch.float32).sort().values
    assert book.numel() == 256 and bool((book[1:] > book[:-1]).all())
    return book


def code_book(kind: str, signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 sorted fp32 levels of code ``kind`` (``dynamic`` or ``linear``)."""
    return _code_book(kind, signed).to(device)


@functools.cache
def _midpoints(kind: str, signed: bool) -> torch.Tensor:
    book = _code_book(kind, signed)
    return (book[1:] + book[:-1]) / 2


def quantize_blockwise(
    x: torch.Tensor, kind: str = "dynamic", signed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` to ``(codes, absmax)``: uint8 codes shaped like ``x`` and one fp32 absmax per
    block of ``BLOCK`` values (in row-major order). Non-negative ``x`` should use ``signed=False``."""
    # The nearest level's index is the number of midpoints below the value (ties go down).
    mids = _midpoints(kind, signed).to(x.device)
    flat = x.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = max(1, -(-n // BLOCK))
    blocks = torch.nn.functional.pad(flat, (0, n_blocks * BLOCK - n)).view(n_blocks, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block keeps absmax 0 (so it decodes to zeros) but divides by 1.
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = torch.empty(n_blocks, BLOCK, dtype=torch.uint8, device=x.device)
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        stop = start + _CHUNK_BLOCKS
        normed = blocks[start:stop] / safe[start:stop, None]
        codes[start:stop] = torch.searchsorted(mids, normed).to(torch.uint8)
    return codes.view(-1)[:n].view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor, absmax: torch.Tensor, kind: str = "dynamic", signed: bool = True
) -> torch.Tensor:
    """The fp32 tensor that ``(codes, absmax)`` from :func:`quantize_blockwise` stand for."""
    book = code_book(kind, signed, codes.device)
    flat = codes.reshape(-1)
    n = flat.numel()
    n_blocks = absmax.numel()
    padded = torch.nn.functional.pad(flat, (0, n_blocks * BLOCK - n)).view(n_blocks, BLOCK)
    values = book[padded.long()] * absmax[:, None]
    return values.view(-1)[:n].view(codes.shape)


def max_abs_error(kind: str, signed: bool) -> float:
    """Worst-case ``|x - dequantize(quantize(x))| / absmax`` of a block: half the widest gap
    between neighbouring levels of the code book over its range."""
    book = _code_book(kind, signed)
    book = book[book >= -1.0]
    return float((book[1:] - book[:-1]).max()) / 2
