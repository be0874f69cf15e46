"""Benchmark of the packed-weight kernels against fp16 cuBLAS (not a test).

On CUDA, for (M, K, N) in {1, 16, 128} x {(4096, 4096), (4096, 11008), (11008, 4096)}, times

- ``cublas_fp16``: ``torch.nn.functional.linear`` with the dense fp16 weight (cuBLAS);
- ``w4a16``: :func:`presso.kernels.wquant_matmul.dequant_matmul`, int4, groups of 128, asymmetric,
  on the N-major layout of ``prepare_weight`` (split-K GEMV for batch <= 4, tl.dot GEMM above);
- ``w4a16_ct``: the same on compressed-tensors' layout as stored (no repack);
- ``w4a16_2of4``: :func:`presso.kernels.sparse24.sparse24_matmul`, 2:4 sparse int4;

plus, on 4096 x 4096, the GEMV and the GEMM path forced at batch 1, 2, 4, 8 (where to switch).
Each time is the median of ``--reps`` runs between CUDA events, with L2 flushed before every run
so weights come from HBM. GB/s counts the bytes a kernel must move (weights, scales, zero points,
activations, output); speedup is cuBLAS's time over the kernel's. Writes ``--out`` as JSON
(``rows``: ``M, K, N, kernel, us, gbps, speedup`` plus ``us_eager``, ``pct_peak`` and ``max_err``;
``us`` is the CUDA-graph replay time) and prints a
table.

The kernels are timed as kernels (``backend="triton"``), whatever the dispatcher would pick; the
speedups also go to ``kernels/measured/<gpu>.json`` (``--table``), the table from which the
dispatcher decides, on that GPU model, where a kernel pays and where dequantize-then-cuBLAS is
faster. ``--table-from RESULTS.json`` rebuilds that table from an earlier run's results.

On a machine without CUDA it runs the kernels' correctness sweep under Triton's interpreter and
says that timings need a GPU.

    python bench/kernel_speed.py [--peak-gbps 3350] [--reps 200] [--out bench/results/kernels.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
BATCHES = [1, 16, 128]
GROUP = 128
DEVICE = "cuda"
REPO = Path(__file__).resolve().parents[1]
# HBM bandwidth by device-name fragment, GB/s (vendor figures).
PEAK_GBPS = [
    ("H200", 4800),
    ("H100 NVL", 3900),
    ("H100 PCIe", 2000),
    ("H100", 3350),
    ("A100-SXM4-80GB", 2039),
    ("A100", 1555),
    ("L40S", 864),
]


def _packed_layer(n: int, k: int, bits=4, group=GROUP, seed=0, device="cpu"):
    from presso.kernels.packing import pack_int32

    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scale = (torch.rand(n, groups, generator=gen) * 0.02 + 0.005).half()
    zp = pack_int32(torch.randint(0, 1 << bits, (n, groups), generator=gen), bits, dim=0)
    return codes, pack_int32(codes, bits).to(device), scale.to(device), zp.to(device)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _time_us(fn, reps: int, flush: torch.Tensor) -> tuple[float, float]:
    """Median GPU microseconds of ``fn`` with a cold L2: ``(graph, eager)``.

    A batch-1 layer runs in a few microseconds, less than Python takes to launch it, so the
    eager figure mostly measures launch overhead. Replaying ``fn`` from a CUDA graph (as an
    inference engine would) measures the kernel itself; both are reported."""
    fn()  # compiles and autotunes
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn()
    return _median_us(graph.replay, reps, flush), _median_us(fn, reps, flush)


def _median_us(fn, reps: int, flush: torch.Tensor) -> float:
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        flush.zero_()  # evict L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) * 1e3


def _peak(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((gbps for frag, gbps in PEAK_GBPS if frag in name), None)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def gpu_benchmark(args) -> list[dict]:
    from presso.kernels import sparse24 as sp
    from presso.kernels import wquant_matmul as wq
    from presso.kernels.dispatch import triton_module

    dense = triton_module("_wquant_triton")
    linear = torch.nn.functional.linear
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=DEVICE)
    rows = []

    def add(m, k, n, kernel, fn, nbytes, ref):
        err = _rel_err(fn(), ref)
        us, us_eager = _time_us(fn, args.reps, flush)
        rows.append(
            dict(
                M=m,
                K=k,
                N=n,
                kernel=kernel,
                us=round(us, 2),
                us_eager=round(us_eager, 2),
                gbps=round(nbytes / us / 1e3, 1),
                max_err=float(f"{err:.2e}"),
            )  # fmt: skip
        )
        print(
            f"  {kernel:<16} M={m:<4} K={k:<6} N={n:<6} {us:9.2f} us ({us_eager:.2f} eager)",
            flush=True,
        )

    for k, n in SHAPES:
        codes, wp, scale, zp = _packed_layer(n, k, device=DEVICE)
        w = wq.dequantize_weight(wp, scale, zp, 4, GROUP, k)  # fp32 [N, K]
        w16 = w.half()
        prepared = wq.prepare_weight(wp, scale, zp, 4)
        keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
        keep[..., 1::2] = True  # any 2:4 pattern moves the same bytes
        values, positions = (t.to(DEVICE) for t in sp.compress_24(codes, keep.flatten(1)))
        w24 = w * keep.flatten(1).to(DEVICE)
        packed_bytes = _nbytes(wp, scale, zp)
        prepared_bytes = _nbytes(*prepared)  # fp16 zero points: a little more than packed
        sparse_bytes = _nbytes(values, positions, scale, zp)
        for m in BATCHES:
            x = torch.randn(m, k, device=DEVICE).half()
            io = _nbytes(x) + m * n * 2
            ref = (x.float() @ w.T).half()
            add(m, k, n, "cublas_fp16", partial(linear, x, w16), _nbytes(w16) + io, ref)
            kernel = partial(wq.dequant_matmul, x, wp, scale, zp, 4, GROUP, backend="triton")
            add(m, k, n, "w4a16", partial(kernel, prepared=prepared), prepared_bytes + io, ref)
            if not args.skip_ct_layout:
                add(m, k, n, "w4a16_ct", kernel, packed_bytes + io, ref)
            fn = partial(sp.sparse24_matmul, x, values, positions, scale, zp, 4, GROUP,
                         backend="triton")  # fmt: skip
            add(m, k, n, "w4a16_2of4", fn, sparse_bytes + io, (x.float() @ w24.T).half())
        if (k, n) == SHAPES[0] and not args.skip_crossover:
            for m in (1, 2, 4, 8):
                x = torch.randn(m, k, device=DEVICE).half()
                io = _nbytes(x) + m * n * 2
                ref = (x.float() @ w.T).half()
                for path in ("gemv", "gemm"):
                    fn = partial(dense.dequant_matmul_triton, x, *prepared, 4, GROUP,
                                 gemv=path == "gemv")  # fmt: skip
                    add(m, k, n, f"w4a16_{path}", fn, prepared_bytes + io, ref)
                add(m, k, n, "cublas_fp16", partial(linear, x, w16), _nbytes(w16) + io, ref)
    base = {(r["M"], r["K"], r["N"]): r["us"] for r in rows if r["kernel"] == "cublas_fp16"}
    for r in rows:
        r["speedup"] = round(base[(r["M"], r["K"], r["N"])] / r["us"], 2)
    return rows


def print_table(rows: list[dict], peak: float | None) -> None:
    print(f"\n{'M':>4} {'K':>6} {'N':>6}  {'kernel':<16} {'us':>9} {'GB/s':>8} {'%peak':>6} "
          f"{'speedup':>8} {'max_err':>9}")  # fmt: skip
    for r in rows:
        pct = f"{100 * r['gbps'] / peak:5.1f}" if peak else "  n/a"
        print(f"{r['M']:>4} {r['K']:>6} {r['N']:>6}  {r['kernel']:<16} {r['us']:>9.2f} "
              f"{r['gbps']:>8.1f} {pct:>6} {r['speedup']:>7.2f}x {r['max_err']:>9.1e}")  # fmt: skip


def cpu_sweep() -> bool:
    """The kernels under the interpreter against their references; True when all pass."""
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel modules are first built
    from presso.kernels import grad_quant as gq
    from presso.kernels import sparse24 as sp
    from presso.kernels import wquant_matmul as wq

    tol = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
    ok = True
    print(f"{'check':<44} {'max_err':>9}  result")
    for m, n, k, bits, group, dtype in [
        (1, 100, 300, 4, 32, torch.float16),
        (3, 96, 256, 8, 64, torch.bfloat16),
        (16, 100, 300, 4, 128, torch.float16),
        (33, 64, 256, 4, 64, torch.float32),
    ]:
        _, wp, scale, zp = _packed_layer(n, k, bits, group, seed=m)
        x = torch.randn(m, k).to(dtype)
        err = _rel_err(wq.dequant_matmul(x, wp, scale, zp, bits, group),
                       wq.dequant_matmul_reference(x, wp, scale, zp, bits, group))  # fmt: skip
        ok &= err <= tol[dtype]
        name = f"w{bits}a16 M={m} N={n} K={k} g{group} {str(dtype)[6:]}"
        print(f"{name:<44} {err:>9.1e}  {'pass' if err <= tol[dtype] else 'FAIL'}")
    codes, _, scale, zp = _packed_layer(64, 256)
    keep = torch.zeros(64, 64, 4, dtype=torch.bool)
    keep[..., :2] = True
    values, positions = sp.compress_24(codes, keep.flatten(1))
    for m in (1, 33):
        x = torch.randn(m, 256).half()
        err = _rel_err(sp.sparse24_matmul(x, values, positions, scale, zp, 4, GROUP),
                       sp.sparse24_matmul_reference(x, values, positions, scale, zp, 4, GROUP))  # fmt: skip
        ok &= err <= tol[torch.float16]
        print(f"{f'2:4 w4a16 M={m} N=64 K=256':<44} {err:>9.1e}  "
              f"{'pass' if err <= tol[torch.float16] else 'FAIL'}")  # fmt: skip
    for bits in (2, 3, 4, 8):
        x = torch.randn(1000)
        noise = gq.uniform_noise(2, 512, seed=bits)
        same = all(torch.equal(a, b) for a, b in zip(gq.quantize_pack(x, bits, 512, noise=noise),
                   gq.quantize_pack_reference(x, bits, 512, noise=noise)))  # fmt: skip
        ok &= same
        print(f"{f'grad quantize+pack {bits}-bit, bit-identical':<44} {'':>9}  "
              f"{'pass' if same else 'FAIL'}")  # fmt: skip
    return ok


TABLE_KERNELS = ("w4a16", "w4a16_ct", "w4a16_2of4")  # what the dispatcher chooses between


def write_table(results: dict, folder: Path) -> Path:
    """The dispatcher's table for this GPU model: each kernel's speedup over cuBLAS fp16 at
    every measured (M, K, N)."""
    from presso.kernels.dispatch import device_slug

    speedup: dict[str, list] = {}
    for r in results["rows"]:
        if r["kernel"] in TABLE_KERNELS:
            speedup.setdefault(r["kernel"], []).append([r["M"], r["K"], r["N"], r["speedup"]])
    meta = {k: results[k] for k in ("device", "torch", "triton", "group_size", "reps")}
    path = folder / f"{device_slug(results['device'])}.json"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'  "{kernel}": {json.dumps(rows)}' for kernel, rows in speedup.items()]
    head = json.dumps(meta, indent=1)[:-2]  # one kernel per line, so diffs stay readable
    path.write_text(head + ',\n "speedup": {\n' + ",\n".join(lines) + "\n }\n}\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak-gbps", type=float, help="HBM bandwidth of this GPU, GB/s")
    parser.add_argument("--reps", type=int, default=200, help="timed runs per kernel and shape")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results/kernels.json")
    parser.add_argument("--skip-ct-layout", action="store_true", help="no w4a16_ct rows")
    parser.add_argument("--skip-crossover", action="store_true", help="no GEMV/GEMM batch sweep")
    parser.add_argument("--table", type=Path, default=REPO / "kernels/measured",
                        help="folder of the dispatcher's per-GPU tables")  # fmt: skip
    parser.add_argument("--table-from", type=Path, metavar="RESULTS",
                        help="only rebuild the table from an earlier --out JSON")  # fmt: skip
    args = parser.parse_args(argv)
    if args.table_from:
        print(f"wrote {write_table(json.loads(args.table_from.read_text()), args.table)}")
        return 0
    if not torch.cuda.is_available():
        ok = cpu_sweep()
        print("\nNo CUDA device: ran the interpreter correctness sweep; GPU timings need a GPU.")
        return 0 if ok else 1
    import triton

    name = torch.cuda.get_device_name()
    peak = _peak(name, args.peak_gbps)
    print(f"{name}, peak {peak or 'unknown (pass --peak-gbps)'} GB/s, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)  # fmt: skip
    rows = gpu_benchmark(args)
    for r in rows:
        r["pct_peak"] = round(100 * r["gbps"] / peak, 1) if peak else None
    print_table(rows, peak)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, peak_gbps=peak, torch=torch.__version__, triton=triton.__version__,
                group_size=GROUP, reps=args.reps)  # fmt: skip
    args.out.write_text(json.dumps(dict(meta, rows=rows), indent=1) + "\n")
    print(f"\nwrote {args.out} and {write_table(dict(meta, rows=rows), args.table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
