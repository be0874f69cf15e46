"""Stored format of SpQR-style layers (``presso-spqr``): small groups, quantized grid statistics,
and a sparse list of fp16 outliers.

A layer ``[N, K]`` with groups of ``group_size`` input columns stores (``G = K / group_size``):

- ``weight_packed``, ``weight_shape``: the codes, exactly as ``pack-quantized`` stores them;
- ``scale_packed`` (``stat_bits``-bit codes of the ``[N, G]`` first-level scales, packed along
  N) with ``scale_lo`` and ``scale_step`` (fp16 ``[N / stat_group, G]``): each run of
  ``stat_group`` rows of a column group shares one second-level grid, and
  ``scale = scale_lo + code · scale_step``;
- for asymmetric grids, ``zero_packed``, ``zero_lo``, ``zero_step`` likewise; the zero points'
  second-level grid has integer ``lo`` and ``step``, so they stay integer codes;
- the outliers, in :mod:`presso.kernels.outliers`' CSR form: ``outlier_row_ptr``,
  ``outlier_col_idx``, ``outlier_values`` (fp16). The code under an outlier is the zero point,
  so the dense part is exactly 0 there and the outlier simply adds.

Every one of these tensors counts in the artifact's average bits. At load, the layer expands the
statistics once into the dense ``pack-quantized`` scales and zero points and computes through
:func:`presso.kernels.wquant_matmul.dequant_matmul` with the outliers added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from presso.compressors.formats.linear import SpQRLinear
from presso.compressors.registry import register_format
from presso.kernels.outliers import Outliers, outliers_to_dense
from presso.kernels.packing import pack_int32, unpack_int32
from presso.kernels.wquant_matmul import dequantize_weight

FP16_TINY = 2.0**-24  # the smallest positive fp16: a scale grid's floor, so scales stay > 0


def quantize_stats(v: torch.Tensor, bits: int, group: int, integer: bool):
    """Second-level grid of ``v`` ``[N, G]`` over runs of ``group`` rows.

    Returns ``(codes uint8 [N, G], lo fp16, step fp16 [N / group, G], dequantized fp32)``.
    ``integer`` grids (for zero points) have integer ``lo`` and ``step`` and never leave the
    run's ``[min, max]``; the others (scales) are floored at the smallest positive fp16.
    """
    n, cols = v.shape
    top = (1 << bits) - 1
    vg = v.float().reshape(n // group, group, cols)
    lo, hi = vg.amin(1), vg.amax(1)
    if integer:
        step = ((hi - lo) / top).ceil().clamp(min=1)
        max_code = ((hi - lo) / step).floor()
    else:
        lo = lo.clamp(min=FP16_TINY).half().float()
        step = ((hi - lo) / top).half().float()
        step = torch.where(step > 0, step, torch.ones_like(step))  # a constant run: all codes 0
        max_code = torch.full_like(step, top)
    lo, step = lo.half(), step.half()
    codes = ((vg - lo.float().unsqueeze(1)) / step.float().unsqueeze(1)).round()
    codes = torch.minimum(codes.clamp(min=0), max_code.unsqueeze(1))
    codes = codes.reshape(n, cols).to(torch.uint8)
    return codes, lo, step, dequantize_stats(codes, lo, step)


def dequantize_stats(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    group = codes.shape[0] // lo.shape[0]
    lo_rows = lo.float().repeat_interleave(group, dim=0)
    return lo_rows + codes.float() * step.float().repeat_interleave(group, dim=0)


@register_format
@dataclass
class SpQRWeight:
    """Small-group codes with quantized grid statistics and a sparse list of fp16 outliers."""

    q: torch.Tensor  # int8 [N, K] codes; the zero point under each outlier
    scale_codes: torch.Tensor  # uint8 [N, G]
    scale_lo: torch.Tensor  # fp16 [N / stat_group, G]
    scale_step: torch.Tensor  # fp16 [N / stat_group, G]
    zero_codes: torch.Tensor | None  # uint8 [N, G]; None when symmetric
    zero_lo: torch.Tensor | None
    zero_step: torch.Tensor | None
    outliers: Outliers  # CSR, fp16 values added to the dense part
    bits: int
    group_size: int
    stat_bits: int

    format = "presso-spqr"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-level scales (fp32) and integer zero points (int32), ``[N, G]``."""
        scale = dequantize_stats(self.scale_codes, self.scale_lo, self.scale_step)
        if self.zero_codes is None:
            return scale, torch.zeros(scale.shape, dtype=torch.int32)
        zero = dequantize_stats(self.zero_codes, self.zero_lo, self.zero_step)
        return scale, zero.to(torch.int32)

    def dense_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``weight_packed``, ``weight_scale``, ``weight_zero_point`` of the dense part."""
        offset = 1 << (self.bits - 1)
        scale, zero = self.grid()
        packed_zero = None
        if self.zero_codes is not None:
            packed_zero = pack_int32(zero + offset, self.bits, dim=0)
        return pack_int32(self.q.to(torch.int32) + offset, self.bits), scale, packed_zero

    def dequantize(self) -> torch.Tensor:
        k = self.shape[1]
        w = dequantize_weight(*self.dense_tensors(), self.bits, self.group_size, k)
        return w + outliers_to_dense(self.outliers, k)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "weight_packed": self.dense_tensors()[0],
            "weight_shape": torch.tensor(self.shape, dtype=torch.int64),
            "scale_packed": pack_int32(self.scale_codes, self.stat_bits, dim=0),
            "scale_lo": self.scale_lo,
            "scale_step": self.scale_step,
            "outlier_row_ptr": self.outliers.row_ptr,
            "outlier_col_idx": self.outliers.col_idx,
            "outlier_values": self.outliers.values,
        }
        if self.zero_codes is not None:
            out["zero_packed"] = pack_int32(self.zero_codes, self.stat_bits, dim=0)
            out["zero_lo"], out["zero_step"] = self.zero_lo, self.zero_step
        return out

    def scheme(self) -> dict:
        return {
            "num_bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.zero_codes is None,
            "stat_bits": self.stat_bits,
            "outliers": self.outliers.values.numel(),
        }

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], scheme: dict) -> SpQRWeight:
        n, k = (int(v) for v in t["weight_shape"])
        bits, stat_bits = scheme["num_bits"], scheme["stat_bits"]
        q = unpack_int32(t["weight_packed"], bits, k).to(torch.int32) - (1 << (bits - 1))
        zero = (None, None, None)
        if "zero_packed" in t:
            codes = unpack_int32(t["zero_packed"], stat_bits, n, dim=0)
            zero = (codes, t["zero_lo"], t["zero_step"])
        outliers = Outliers(t["outlier_row_ptr"], t["outlier_col_idx"], t["outlier_values"])
        return cls(
            q.to(torch.int8),
            unpack_int32(t["scale_packed"], stat_bits, n, dim=0),
            t["scale_lo"],
            t["scale_step"],
            *zero,
            outliers,
            bits,
            scheme["group_size"],
            stat_bits,
        )

    def module(self, bias: torch.Tensor | None) -> torch.nn.Module:
        return SpQRLinear(self, bias)
