"""Dense bit-packing of small unsigned integer codes into int32 words.

The layout is compressed-tensors' ``pack-quantized`` layout: along the packed dimension, element
``i`` occupies bits ``[i*bits, (i+1)*bits)`` of a little-endian bit stream, 32 elements fill exactly
``bits`` words, and the last word is zero-padded. For 4 and 8 bits this is the familiar
"8 (or 4) codes per int32, lowest code in the lowest bits"; for 3, 5, 6 and 7 bits codes straddle
word boundaries, which wastes no bits.

Codes are unsigned (``0 <= code < 2**bits``). compressed-tensors stores signed weights shifted by
``2**(bits-1)``; that offset belongs to the quantizer, not to the packer.
"""

from __future__ import annotations

import math

import torch


def packed_length(n: int, bits: int) -> int:
    """int32 words needed for ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"packing supports 1..8 bits, got {bits}")


def pack_int32(codes: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack unsigned ``codes`` (any integer dtype) along ``dim`` into int32 words."""
    _check_bits(bits)
    codes = codes.movedim(dim, -1)
    n = codes.shape[-1]
    if bits in (1, 2, 4, 8):  # codes never straddle a word: shift-and-or, cheap and exact
        per_word = 32 // bits
        pad = (-n) % per_word
        c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad))
        c = c.reshape(*c.shape[:-1], -1, per_word)
        shifts = torch.arange(per_word, device=c.device, dtype=torch.int64) * bits
        words = (c << shifts).sum(-1)
    else:  # general case: expand to a bit stream, regroup by 32
        bit_idx = torch.arange(bits, device=codes.device, dtype=torch.int64)
        stream = ((codes.to(torch.int64).unsqueeze(-1) >> bit_idx) & 1).flatten(-2)
        stream = torch.nn.functional.pad(stream, (0, (-stream.shape[-1]) % 32))
        stream = stream.reshape(*stream.shape[:-1], -1, 32)
        words = (stream << torch.arange(32, device=codes.device, dtype=torch.int64)).sum(-1)
    # Reinterpret the low 32 bits as a signed int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: the first ``n`` codes along ``dim``, as uint8."""
    _check_bits(bits)
    w = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    if bits in (1, 2, 4, 8):
        per_word = 32 // bits
        shifts = torch.arange(per_word, device=w.device, dtype=torch.int64) * bits
        codes = ((w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    else:
        stream = ((w.unsqueeze(-1) >> torch.arange(32, device=w.device)) & 1).flatten(-2)
        stream = stream[..., : (stream.shape[-1] // bits) * bits]
        stream = stream.reshape(*stream.shape[:-1], -1, bits)
        codes = (stream << torch.arange(bits, device=w.device)).sum(-1)
    return codes[..., :n].to(torch.uint8).movedim(-1, dim).contiguous()
