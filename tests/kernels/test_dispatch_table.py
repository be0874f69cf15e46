"""On a GPU, a Triton kernel runs only where it was measured faster than dequantize-then-cuBLAS
(issue: the 2:4 kernel was 10x slower than dense everywhere, and W4A16 slower at batch >= 16, yet
the dispatcher always chose them). These check the decision against the committed H200 table."""

import torch

from presso.kernels.dispatch import measured_speedup, measured_table, triton_pays

H200 = measured_table("NVIDIA H200")


def test_the_h200_table_is_committed_and_read():
    assert H200 is not None and {"w4a16", "w4a16_2of4"} <= H200.keys()


def test_nearest_shape_and_batch_rounded_up():
    """Batch 1 at 4096x11008 measured 1.73x; batch 2 rounds up to the batch-16 row (0.74x), and a
    4096x12288 layer takes its nearest measured shape."""
    assert measured_speedup(H200, "w4a16", 1, 4096, 11008) == 1.73
    assert measured_speedup(H200, "w4a16", 2, 4096, 11008) == 0.74
    assert measured_speedup(H200, "w4a16", 1, 4096, 12288) == 1.73
    assert measured_speedup(H200, "w4a16", 4096, 4096, 4096) == 0.34  # beyond the largest batch


def test_unmeasured_kernels_and_gpus_fall_back():
    assert measured_speedup(H200, "w8a16", 1, 4096, 4096) is None
    assert measured_speedup(None, "w4a16", 1, 4096, 4096) is None
    assert measured_table("A GPU nobody measured") is None


def test_cpu_tensors_are_not_the_tables_business():
    """On the CPU the kernels run only under the interpreter (tests); the table is for GPUs."""
    assert triton_pays("w4a16_2of4", torch.zeros(1, 64), 64, 64)
