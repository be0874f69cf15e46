"""Stochastic-rounding quantization to 2, 3, 4 or 8 bits with one ``(min, scale)`` per bucket.

The payload is one int32 vector, ``[packed codes | (min, scale) fp32 bits]``, all-gathered; every
worker dequantizes all workers' payloads in rank order, so the sums agree bit for bit. Stochastic
rounding makes each payload an unbiased estimate of its input; error feedback keeps the residual.
The random streams differ per worker, step and layer (``seed``) so workers' rounding errors are
independent and average out.
"""

from __future__ import annotations

import torch

# Fused Triton kernels on CUDA (and under TRITON_INTERPRET=1), the torch reference otherwise.
from presso.kernels.grad_quant import quantize_pack, unpack_dequantize


class Quantize:
    """The quantization family; the parameter is the bit width."""

    least = 2  # strongest compression: a tensor it cannot shrink is sent dense

    def __init__(self, bucket_size: int = 512):
        self.bucket_size = bucket_size  # values sharing one (min, scale), a multiple of 32

    def clamp(self, shape: torch.Size, bits: int) -> int:
        return int(bits)  # any supported width fits any tensor

    def _buckets(self, numel: int) -> int:
        return max(1, -(-numel // self.bucket_size))

    def _code_words(self, numel: int, bits: int) -> int:
        return self._buckets(numel) * bits * self.bucket_size // 32

    def payload_bytes(self, shape: torch.Size, bits: int) -> int:
        """Packed codes plus two fp32 values per bucket."""
        numel = torch.Size(shape).numel()
        return 4 * (self._code_words(numel, bits) + 2 * self._buckets(numel))

    def errors(self, grad: torch.Tensor, bits_list: list[int]) -> list[float]:
        """Expected squared error of stochastic rounding, in closed form: a value a fraction ``f``
        of a step above a grid point rounds up with probability ``f``, so its expected squared
        error is ``scale² f (1 - f)``. Exact in expectation, so re-plans do not chase noise."""
        x = grad.reshape(-1).double()
        n = x.numel()
        if not n:
            return [0.0] * len(bits_list)
        pad = self._buckets(n) * self.bucket_size - n
        xb = torch.cat([x, x[-1].expand(pad)]).view(-1, self.bucket_size)  # padding as the kernel
        lo = xb.amin(1, keepdim=True)
        spread = xb.amax(1, keepdim=True) - lo
        out = []
        for bits in bits_list:
            scale = spread / ((1 << bits) - 1)
            t = torch.where(scale > 0, (xb - lo) / scale, torch.zeros_like(xb))
            frac = t - t.floor()
            out.append(float((scale.square() * frac * (1 - frac)).reshape(-1)[:n].sum()))
        return out

    def encode(self, x: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
        """Flat fp32 ``x`` to its int32 payload."""
        packed, meta = quantize_pack(x, bits, self.bucket_size, seed=seed)
        return torch.cat([packed.reshape(-1), meta.reshape(-1).view(torch.int32)])

    def decode_add(self, payload: torch.Tensor, bits: int, out: torch.Tensor) -> None:
        """Add the dequantized payload into flat fp32 ``out``."""
        words = self._code_words(out.numel(), bits)
        packed = payload[:words].view(self._buckets(out.numel()), -1)
        meta = payload[words:].view(torch.float32).view(-1, 2)
        out += unpack_dequantize(packed, meta, bits, self.bucket_size, out.numel())
