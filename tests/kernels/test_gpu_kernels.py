"""The compiled kernels on CUDA against the torch references (skipped without CUDA).

Most tests pin one tile config so that a GPU run compiles a handful of kernels instead of the
whole autotune list per case; one test goes through the autotuner on a realistic layer.
"""

from __future__ import annotations

import pytest
import torch

from presso.kernels import grad_quant as gq
from presso.kernels import sparse24 as sp
from presso.kernels import wquant_matmul as wq
from presso.kernels.dispatch import triton_module
from presso.kernels.outliers import outliers_from_dense
from presso.kernels.packing import pack_int32

pytestmark = pytest.mark.gpu

GEMV = {"BLOCK_N": 128, "BLOCK_KW": 16, "SPLIT_K": 4}
GEMV_BATCH = {"BLOCK_N": 64, "BLOCK_KW": 8, "SPLIT_K": 4}  # batch 3..8: smaller accumulators
GEMM = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_KW": 16}


def _x(m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).cuda()


@pytest.mark.parametrize(
    "m,n,k,bits,group,asym,dtype,prepared",
    [
        (1, 4096, 4096, 4, 128, True, torch.float16, True),
        (1, 1000, 1000, 4, 32, False, torch.bfloat16, False),
        (3, 512, 768, 8, 64, True, torch.float16, True),
        (8, 700, 1024, 4, 128, False, torch.float16, True),
        (16, 1000, 1000, 4, 64, True, torch.float16, True),
        (33, 512, 768, 8, 128, False, torch.bfloat16, False),
        (128, 1024, 4096, 4, 128, True, torch.bfloat16, True),
    ],
)
def test_dense_kernels_on_cuda(
    make_quantized, assert_close, m, n, k, bits, group, asym, dtype, prepared
):
    """GEMV (batch <= 8 here) and tl.dot GEMM on CUDA, both weight layouts, ragged N and K: the
    compiled code (vector loads, wgmma, split-K fixup through L2) computes the reference."""
    kernels = triton_module("_wquant_triton")
    wp, scale, zp = make_quantized(n, k, bits, group, asym, seed=m, device="cuda")
    x = _x(m, k, dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    gemv = m <= 8  # the GEMV kernel takes up to 8 rows, whatever the default switch
    config = (GEMV if m <= 2 else GEMV_BATCH) if gemv else GEMM
    if prepared:
        layout = wq.prepare_weight(wp, scale, zp, bits)
        y = kernels.dequant_matmul_triton(x, *layout, bits, group, bias, config=config, gemv=gemv)
    else:  # compressed-tensors' layout as stored, read through strides
        y = kernels.dequant_matmul_triton(
            x, wp.t(), scale.t(), zp, bits, group, bias, zero_packed=True, config=config, gemv=gemv
        )
    assert_close(y, wq.dequant_matmul_reference(x, wp, scale, zp, bits, group, bias))


def test_autotuned_gemv_and_split_k_determinism(make_quantized, assert_close):
    """The autotuned batch-1 path on a 4096 x 4096 layer matches the reference; a forced split-K
    launch repeats bit for bit (fixed-order sum of partials) and leaves its counters at zero."""
    kernels = triton_module("_wquant_triton")
    wp, scale, zp = make_quantized(4096, 4096, 4, 128, True, device="cuda")
    x = _x(1, 4096, torch.float16)
    prepared = wq.prepare_weight(wp, scale, zp, 4)
    ref = wq.dequant_matmul_reference(x, wp, scale, zp, 4, 128)
    assert_close(wq.dequant_matmul(x, wp, scale, zp, 4, 128, prepared=prepared), ref)
    runs = [kernels.dequant_matmul_triton(x, *prepared, 4, 128, config=GEMV) for _ in range(5)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    torch.cuda.synchronize()
    assert int(kernels._counters[x.device].abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 40])
def test_outliers_on_cuda(make_quantized, assert_close, m):
    """The CSR outlier epilogue (in the split-K fixup and in the GEMM) adds the sparse fp16
    correction exactly where the reference does."""
    kernels = triton_module("_wquant_triton")
    n, k = 512, 1024
    wp, scale, zp = make_quantized(n, k, 4, 128, True, device="cuda")
    dense = torch.where(torch.rand(n, k) < 0.01, torch.randn(n, k), 0.0)
    outliers = outliers_from_dense(dense.cuda())
    x = _x(m, k, torch.float16)
    config = GEMV if m <= kernels.GEMV_MAX_M else GEMM
    prepared = wq.prepare_weight(wp, scale, zp, 4)
    y = kernels.dequant_matmul_triton(x, *prepared, 4, 128, None, outliers, config=config)
    assert_close(y, wq.dequant_matmul_reference(x, wp, scale, zp, 4, 128, None, outliers))


@pytest.mark.parametrize("m,dtype", [(1, torch.float16), (64, torch.bfloat16)])
def test_sparse24_on_cuda(assert_close, m, dtype):
    """2:4 decoding plus dense tl.dot on CUDA matches the reference."""
    kernels = triton_module("_sparse24_triton")
    n, k = 768, 1024
    gen = torch.Generator().manual_seed(m)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    top = torch.rand(n, k // 4, 4, generator=gen).topk(2, dim=-1).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, top, True).flatten(1)
    values, positions = (t.cuda() for t in sp.compress_24(codes, mask))
    scale = (torch.rand(n, k // 128, generator=gen) * 0.05 + 0.01).half().cuda()
    zp = pack_int32(torch.randint(0, 16, (n, k // 128), generator=gen), 4, dim=0).cuda()
    x = _x(m, k, dtype)
    config = {"BLOCK_M": 16 if m == 1 else 64, "BLOCK_N": 64, "BLOCK_G": 16}
    y = kernels.sparse24_matmul_triton(x, values, positions, scale, zp, 4, 128, config=config)
    assert_close(y, sp.sparse24_matmul_reference(x, values, positions, scale, zp, 4, 128))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_grad_quant_bit_identical_on_cuda(bits):
    """With the same uniforms the fused kernels reproduce the CUDA reference word for word (IEEE
    division, no fused multiply-add), so mixed workers still sum identical payloads."""
    n, bucket = 100_000, 512
    x = torch.randn(n, device="cuda") * 2
    noise = gq.uniform_noise(-(-n // bucket), bucket, seed=bits, device="cuda")
    packed, meta = gq.quantize_pack(x, bits, bucket, noise=noise)
    ref_packed, ref_meta = gq.quantize_pack_reference(x, bits, bucket, noise=noise)
    assert torch.equal(meta, ref_meta) and torch.equal(packed, ref_packed)
    y = gq.unpack_dequantize(packed, meta, bits, bucket, n)
    assert torch.equal(y, gq.unpack_dequantize_reference(packed, meta, bits, bucket, n))
