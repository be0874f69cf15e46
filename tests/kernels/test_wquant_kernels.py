"""Group-wise dequant-matmul kernels (GEMV and tl.dot GEMM) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from presso import UnsupportedError
from presso.kernels import wquant_matmul as wq
from presso.kernels.dispatch import triton_module
from presso.kernels.outliers import outliers_from_dense, outliers_to_dense

# (M, N, K, bits, group, asym, dtype): batch 1 / 3 take the GEMV path, 16 / 33 the GEMM path.
# N and K are deliberately not multiples of the tiles; K=300 at 4 bits ends mid-word, K=200 with
# groups of 64 or 128 ends in a ragged group.
CASES = [
    (1, 100, 300, 4, 32, True, torch.float16),
    (1, 96, 256, 4, 128, False, torch.bfloat16),
    (3, 70, 256, 8, 64, False, torch.float32),
    (3, 100, 200, 4, 64, True, torch.bfloat16),
    (16, 100, 300, 4, 128, True, torch.float16),
    (16, 64, 256, 8, 32, True, torch.bfloat16),
    (33, 50, 200, 4, 32, False, torch.bfloat16),
    (33, 90, 256, 4, 64, True, torch.float32),
    (5, 40, 96, 2, 32, True, torch.float16),
]


@pytest.mark.parametrize("m,n,k,bits,group,asym,dtype", CASES)
def test_matches_reference(make_quantized, assert_close, m, n, k, bits, group, asym, dtype):
    """Every path (GEMV / GEMM, widths, group sizes, zero points, dtypes, ragged edges) computes
    the reference's product: a wrong shift, mask or group index shows up as a large error."""
    wp, scale, zp = make_quantized(n, k, bits, group, asym, seed=m + k)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = wq.dequant_matmul(x, wp, scale, zp, bits, group, bias)
    assert_close(y, wq.dequant_matmul_reference(x, wp, scale, zp, bits, group, bias))


def _random_case(i: int) -> tuple:
    """Seeded draw of (M, N, K, bits, group, asym, dtype); K is any multiple of 4."""
    gen = torch.Generator().manual_seed(100 + i)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=gen))]

    m = pick([1, 2, 3, 4, 5, 9, 16, 33, 40])
    n = pick(range(17, 131))
    k = 4 * pick(range(8, 80))
    dtype = pick([torch.float16, torch.bfloat16, torch.float32])
    return m, n, k, pick([2, 4, 8]), pick([32, 64, 128]), pick([True, False]), dtype


@pytest.mark.parametrize("i", range(6))
def test_random_shapes(make_quantized, assert_close, i):
    """Seeded random batch, N, K (any multiple of 4), width, group, zero point and dtype: edges
    the hand-picked cases miss still compute the reference's product."""
    m, n, k, bits, group, asym, dtype = _random_case(i)
    wp, scale, zp = make_quantized(n, k, bits, group, asym, seed=i)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(i)).to(dtype)
    prepared = wq.prepare_weight(wp, scale, zp, bits) if i % 2 else None
    y = wq.dequant_matmul(x, wp, scale, zp, bits, group, prepared=prepared)
    assert_close(y, wq.dequant_matmul_reference(x, wp, scale, zp, bits, group))


@pytest.mark.parametrize("m", [1, 2, 16])
def test_prepared_layout_and_outliers(make_quantized, assert_close, m):
    """The N-major repack of prepare_weight and the CSR outlier epilogue give the same product;
    rows with no outliers and one long row exercise the per-row loop bounds."""
    n, k = 90, 200
    wp, scale, zp = make_quantized(n, k, 4, 64, True)
    gen = torch.Generator().manual_seed(2)
    s = torch.where(torch.rand(n, k, generator=gen) < 0.03, torch.randn(n, k, generator=gen), 0.0)
    s[5] = 0
    s[7, :60] = torch.randn(60, generator=gen)
    outliers = outliers_from_dense(s)
    x = torch.randn(2, m, k, generator=gen).half()  # leading batch dims are flattened
    ref = wq.dequant_matmul_reference(x, wp, scale, zp, 4, 64, None, outliers)
    prepared = wq.prepare_weight(wp, scale, zp, 4)
    y = wq.dequant_matmul(x, wp, scale, zp, 4, 64, outliers=outliers, prepared=prepared)
    assert_close(y, ref)
    assert_close(wq.dequant_matmul(x, wp, scale, zp, 4, 64, outliers=outliers), ref)


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_N": 32, "BLOCK_KW": 8, "SPLIT_K": 1},
        {"BLOCK_N": 64, "BLOCK_KW": 4, "SPLIT_K": 3},
        {"BLOCK_N": 16, "BLOCK_KW": 16, "SPLIT_K": 8},  # more splits than tiles: empty splits
    ],
)
def test_gemv_split_k(make_quantized, assert_close, config):
    """Split-K partials are summed by the last program of each column tile, in split order: the
    result matches the reference, is identical run to run, and the counters are reset."""
    kernels = triton_module("_wquant_triton")
    n, k = 72, 160
    wp, scale, zp = make_quantized(n, k, 4, 32, True)
    x = torch.randn(3, k).half()
    prepared = wq.prepare_weight(wp, scale, zp, 4)
    y1 = kernels.dequant_matmul_triton(x, *prepared, 4, 32, config=config)
    y2 = kernels.dequant_matmul_triton(x, *prepared, 4, 32, config=config)
    assert torch.equal(y1, y2)
    assert_close(y1, wq.dequant_matmul_reference(x, wp, scale, zp, 4, 32))
    assert all(int(c.abs().sum()) == 0 for c in kernels._counters.values())


def test_gemv_and_gemm_agree_at_batch_8(make_quantized, assert_close):
    """The GEMV kernel takes up to 8 rows and the tl.dot kernel any number: at batch 8 both give
    the reference's product, so the switch point (GEMV_MAX_M) can move without changing results
    beyond rounding."""
    kernels = triton_module("_wquant_triton")
    wp, scale, zp = make_quantized(64, 128, 4, 128, False)
    x = torch.randn(8, 128)
    prepared = wq.prepare_weight(wp, scale, zp, 4)
    ref = wq.dequant_matmul_reference(x, wp, scale, zp, 4, 128)
    assert_close(kernels.dequant_matmul_triton(x, *prepared, 4, 128, gemv=True), ref)
    assert_close(kernels.dequant_matmul_triton(x, *prepared, 4, 128, gemv=False), ref)


def test_unsupported_widths_fall_back_to_reference(make_quantized, monkeypatch):
    """3-bit codes straddle words, which the kernels do not read: the reference answers, bit for
    bit; so does every width on the CPU without the interpreter."""
    wp, scale, zp = make_quantized(20, 64, 3, 32, True)
    x = torch.randn(2, 64)
    ref = wq.dequant_matmul_reference(x, wp, scale, zp, 3, 32)
    assert torch.equal(wq.dequant_matmul(x, wp, scale, zp, 3, 32), ref)
    monkeypatch.delenv("TRITON_INTERPRET")
    wp, scale, zp = make_quantized(20, 64, 4, 32, True)
    ref = wq.dequant_matmul_reference(x, wp, scale, zp, 4, 32)
    assert torch.equal(wq.dequant_matmul(x, wp, scale, zp, 4, 32), ref)


def test_shape_mismatch_is_a_user_error(make_quantized):
    """Feeding a layer the wrong width is a user error with a message, not an index error."""
    wp, scale, zp = make_quantized(16, 64, 4, 32, False)
    with pytest.raises(UnsupportedError, match="input has 72 features"):
        wq.dequant_matmul(torch.randn(1, 72), wp, scale, zp, 4, 32)
    with pytest.raises(UnsupportedError, match="weight_scale has shape"):
        wq.dequant_matmul(torch.randn(1, 64), wp, scale, zp, 4, 16)


@pytest.mark.parametrize("k,col_dtype", [(100, torch.int16), (40000, torch.int32)])
def test_outlier_format_round_trip(k, col_dtype):
    """CSR outliers hold exactly the fp16 values of the dense correction, with int16 columns
    whenever they fit (half the index bytes) and int32 beyond."""
    gen = torch.Generator().manual_seed(3)
    s = torch.where(torch.rand(6, k, generator=gen) < 0.01, torch.randn(6, k, generator=gen), 0.0)
    s = s.half().float()
    o = outliers_from_dense(s)
    assert o.col_idx.dtype == col_dtype and o.row_ptr.dtype == torch.int32
    assert int(o.row_ptr[-1]) == int((s != 0).sum())
    assert torch.equal(outliers_to_dense(o, k), s)
    assert o.nbytes == 4 * 7 + o.values.numel() * (2 + col_dtype.itemsize)


def test_gemv_autotune_list_fits_groups_and_registers():
    """On CUDA the GEMV configs are pruned per call: tiles shrink to whole groups (g32 at 4 bits
    is 4 words), duplicates go, and batch 8 keeps only tiles whose accumulators fit registers.
    The autotuner hands keyword arguments to the pruner, as here."""
    kernels = triton_module("_wquant_triton")
    configs = kernels._GEMV_CONFIGS
    small = kernels._gemv_prune(configs, {}, BLOCK_M=1, GROUP=32, BITS=4)
    assert {c.kwargs["BLOCK_KW"] for c in small} == {4}
    assert len(small) == len({(tuple(sorted(c.kwargs.items())), c.num_warps) for c in small})
    wide = kernels._gemv_prune(configs, {}, BLOCK_M=1, GROUP=128, BITS=4)
    assert max(c.kwargs["BLOCK_KW"] for c in wide) == 16 and len(wide) >= len(configs) - 1
    batch8 = kernels._gemv_prune(configs, {}, BLOCK_M=8, GROUP=128, BITS=4)
    assert batch8 and all(
        8 * c.kwargs["BLOCK_KW"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps for c in batch8
    )
