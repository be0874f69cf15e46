"""SpQR-style outliers: a sparse fp16 correction added to a dense quantized weight.

A layer of ``N`` outputs and ``K`` inputs stores its outliers in CSR form over the output rows:

- ``row_ptr``: int32 ``[N + 1]``; row ``n``'s entries are ``row_ptr[n] : row_ptr[n + 1]``;
- ``col_idx``: the input column of each entry, ascending within a row; int16 when ``K <= 32768``
  (half the bytes), else int32;
- ``values``: fp16 ``[nnz]``.

The layer computes ``x @ (W_q + S).T`` where ``W_q`` is the dequantized packed weight and
``S[n, col_idx[i]] = values[i]``: the quantizer leaves the outlier's own position to the dense part
(usually its code for 0) and stores the remainder here, so the two parts simply add. At ~1 % of
weights this costs ``(16 + 16) * 0.01 ≈ 0.3`` bits per weight plus ``32 / K`` for the row pointers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from presso import UnsupportedError


class Outliers(NamedTuple):
    row_ptr: torch.Tensor  # int32 [N + 1], CSR row offsets
    col_idx: torch.Tensor  # int16 (K <= 32768) or int32 [nnz], input column of each entry
    values: torch.Tensor  # fp16 [nnz], the correction added to the dequantized weight

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self)


def outliers_from_dense(s: torch.Tensor) -> Outliers:
    """The CSR form of a dense ``[N, K]`` correction, keeping its nonzero entries."""
    if s.dim() != 2:
        raise UnsupportedError(
            f"outliers: expected a 2-D [N, K] correction, got shape {tuple(s.shape)}"
        )
    rows, cols = s.nonzero(as_tuple=True)  # row-major order: rows ascending, columns within a row
    counts = torch.bincount(rows, minlength=s.shape[0])
    row_ptr = torch.zeros(s.shape[0] + 1, dtype=torch.int32, device=s.device)
    row_ptr[1:] = counts.cumsum(0)
    col_dtype = torch.int16 if s.shape[1] <= 32768 else torch.int32
    return Outliers(row_ptr, cols.to(col_dtype), s[rows, cols].to(torch.float16))


def outliers_to_dense(o: Outliers, in_features: int) -> torch.Tensor:
    """The dense fp32 ``[N, K]`` correction that ``o`` stands for."""
    n = o.row_ptr.numel() - 1
    rows = torch.repeat_interleave(
        torch.arange(n, device=o.row_ptr.device), (o.row_ptr[1:] - o.row_ptr[:-1]).long()
    )
    dense = torch.zeros(n, in_features, dtype=torch.float32, device=o.values.device)
    dense[rows, o.col_idx.long()] = o.values.float()
    return dense
