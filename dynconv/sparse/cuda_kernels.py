"""The "cupy" backend of dynconv/sparse/ops.py: its gather/scatter ops as CUDA C kernels compiled at run time.

One kernel per op (the neighbourhood gather, of any tap count, is the row gather through a table of tap rows; the
depthwise conv at chosen positions reads its neighbourhoods from the map itself; the channel gather reads each
image's chosen channels per group; the scatters share one kernel
template: scatter_rows, scatter_add, scatter_add_relu), one thread per element on a 1-D
grid (launch_config). No shared memory, barriers or atomics: every thread owns one
element, and scatter indices never repeat. Each kernel's last two parameters are
the channel count C and the element count `total`; index arithmetic is 64-bit because blockIdx.x * blockDim.x, a
32-bit unsigned product, wraps past 2^32 elements. Indices are trusted: checking their range would cost a sync.

The host code (checks, output allocation, argument order) is written once in make_ops over an abstract launcher, so
the test harness tests/cuda_emulation.py runs it, and these exact kernel sources, on the CPU. Importing this module
needs no GPU and no CuPy: CuPy is imported on the first launch.
"""
import math

import torch
import torch.nn.functional as F

from .ops import Ops

THREADS_PER_BLOCK = 256

# CuPy 14 defaults to -std=c++17; the kernels are plain C, so the oldest standard NVRTC still accepts is enough.
COMPILE_OPTIONS = ("-std=c++14",)

# A scatter kernel: thread i owns element c of row k of `rows`, and STORE writes it to dst[p], p = idx[k] * C + c.
_SCATTER_TEMPLATE = r"""
extern "C" __global__ void NAME(
    float* __restrict__ dst, const long long* __restrict__ idx, const float* __restrict__ rows, long long C,
    long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long k = i / C, c = i - k * C;
    const long long p = idx[k] * C + c;
    STORE
}
"""


def _scatter_source(name, store):
    return _SCATTER_TEMPLATE.replace("NAME", name).replace("STORE", store)


_SOURCES = {
    "gather_rows": r"""
extern "C" __global__ void gather_rows(const float* __restrict__ src, const long long* __restrict__ idx,
                                       float* __restrict__ out, long long C, long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long k = i / C, c = i - k * C;
    out[i] = src[idx[k] * C + c];
}
""",
    # thread i owns channel c of output row j: the k x k neighbourhood of position idx[j] = (image, y, x) is read
    # straight from the map (taps outside it skipped: zero padding), so no tap table or patch rows are built.
    "depthwise_rows": r"""
extern "C" __global__ void depthwise_rows(const float* __restrict__ src, const long long* __restrict__ idx,
                                          const float* __restrict__ weight, const float* __restrict__ bias,
                                          float* __restrict__ out, long long H, long long W, long long K,
                                          long long C, long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long j = i / C, c = i - j * C;
    const long long image = idx[j] / (H * W), y = idx[j] / W % H, x = idx[j] % W;
    float acc = bias[c];
    for (long long dy = 0; dy < K; ++dy) {
        const long long yy = y + dy - K / 2;
        if (yy < 0 || yy >= H) continue;
        for (long long dx = 0; dx < K; ++dx) {
            const long long xx = x + dx - K / 2;
            if (xx < 0 || xx >= W) continue;
            acc += weight[(dy * K + dx) * C + c] * src[((image * H + yy) * W + xx) * C + c];
        }
    }
    out[i] = acc;
}
""",
    # thread i owns element (n, g, p, k) of the (N, G, P, K) output: channel idx[n, g, k] of position p of image n
    "gather_channels": r"""
extern "C" __global__ void gather_channels(const float* __restrict__ src, const long long* __restrict__ idx,
                                           float* __restrict__ out, long long G, long long P, long long K,
                                           long long C, long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const long long k = i % K, p = i / K % P, group = i / (K * P);  // group = n * G + g
    const long long n = group / G;
    out[i] = src[(n * P + p) * C + idx[group * K + k]];
}
""",
    # "v < 0 ? 0 : v" rather than fmaxf(v, 0): NaN propagates, as in torch's relu.
    "bias_relu": r"""
extern "C" __global__ void bias_relu(float* __restrict__ rows, const float* __restrict__ bias, long long C,
                                     long long total) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const float v = rows[i] + bias[i % C];
    rows[i] = v < 0.0f ? 0.0f : v;
}
""",
    "scatter_rows": _scatter_source("scatter_rows", "dst[p] = rows[i];"),
    "scatter_add": _scatter_source("scatter_add", "dst[p] += rows[i];"),
    # NaN propagates, as in bias_relu ("v < 0 ? 0 : v", not fmaxf)
    "scatter_add_relu": _scatter_source("scatter_add_relu", "const float v = dst[p] + rows[i];\n"
                                                            "    dst[p] = v < 0.0f ? 0.0f : v;"),
}


def kernel_sources():
    """{kernel name: CUDA C source}, each a whole compilation unit, exactly as compiled."""
    return dict(_SOURCES)


def launch_config(total):
    """(grid, block) of a launch over `total` elements, one thread each: 1-D, THREADS_PER_BLOCK-thread blocks."""
    return ((total + THREADS_PER_BLOCK - 1) // THREADS_PER_BLOCK, 1, 1), (THREADS_PER_BLOCK, 1, 1)


# ---- input checks ----

def _check(name, t, dtype, ndim):
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _rows(name, t):
    _check(name, t, torch.float32, 2)


def _index(name, t):
    _check(name, t, torch.int64, 1)


def _same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))


def _scatter_checks(dst, idx, rows):
    _rows("dst", dst)
    _index("idx", idx)
    _rows("rows", rows)
    if rows.shape != (idx.shape[0], dst.shape[1]):
        raise ValueError(f"rows must be (len(idx), dst columns) = {(idx.shape[0], dst.shape[1])}, "
                         f"got {tuple(rows.shape)}")
    _same_device(dst=dst, idx=idx, rows=rows)
    # Threads reading rows while others write dst would race if the two overlapped.
    if rows.numel() and rows.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
        raise ValueError("rows must not share memory with dst")


def _bias_checks(rows, bias):
    _rows("rows", rows)
    _check("bias", bias, torch.float32, 1)
    if bias.shape[0] != rows.shape[1]:
        raise ValueError(f"bias must have {rows.shape[1]} entries (rows columns), got {bias.shape[0]}")
    _same_device(rows=rows, bias=bias)


def _depthwise_checks(src, idx, size, weight, bias):
    """depthwise_rows' inputs; returns the kernel size k."""
    _rows("src", src)
    _index("idx", idx)
    _rows("weight", weight)
    _check("bias", bias, torch.float32, 1)
    _same_device(src=src, idx=idx, weight=weight, bias=bias)
    n, h, w = size
    kernel = math.isqrt(weight.shape[0])
    if kernel * kernel != weight.shape[0] or kernel % 2 == 0:
        raise ValueError(f"weight must have k * k rows for an odd k, got {weight.shape[0]}")
    if src.shape[0] != n * h * w:
        raise ValueError(f"src must have N * H * W = {n * h * w} rows for size {tuple(size)}, got {src.shape[0]}")
    if weight.shape[1] != src.shape[1] or bias.shape[0] != src.shape[1]:
        raise ValueError(f"weight columns and bias entries must equal src's {src.shape[1]} channels, got "
                         f"{weight.shape[1]} and {bias.shape[0]}")
    return kernel


# ---- the ops, over an abstract launcher ----

def _scatter_op(run, kernel):
    """The op (dst, idx, rows) -> dst of a scatter kernel: the scatter ops differ only in their kernel's store."""

    def scatter_op_(dst, idx, rows):
        _scatter_checks(dst, idx, rows)
        run(kernel, rows.numel(), dst, idx, rows, dst.shape[1])
        return dst

    return scatter_op_


def _gather_channels_op(run):
    def gather_channels(src, idx, positions):
        _rows("src", src)
        _check("idx", idx, torch.int64, 3)
        _same_device(src=src, idx=idx)
        n, groups, kept = idx.shape
        if src.shape[0] != n * positions:
            raise ValueError(f"src has {src.shape[0]} rows, expected {n} images x {positions} positions")
        out = src.new_empty((n, groups, positions, kept))
        run("gather_channels", out.numel(), src, idx, out, groups, positions, kept, src.shape[1])
        return out
    return gather_channels


def make_ops(launch):
    """The op table (an ops.Ops: the names and signatures of ops.TORCH_OPS) on top of `launch(name, total, *args)`, which runs
    kernel `name` with launch_config(total) on `args` (tensors and ints) followed by `total`."""

    def run(name, total, *args):
        if total > 0:  # CUDA rejects an empty grid
            launch(name, total, *args)

    def gather_rows(src, idx):
        _rows("src", src)
        _index("idx", idx)
        _same_device(src=src, idx=idx)
        out = src.new_empty((idx.shape[0], src.shape[1]))
        run("gather_rows", out.numel(), src, idx, out, src.shape[1])
        return out

    def gather_patches(src, taps):
        # a row gather through the (K, T) tap table, read flat: row k * T + t of the (K * T, C) result is tap t of
        # window k, so the (K, T * C) output is the same memory
        _rows("src", src)
        _check("taps", taps, torch.int64, 2)
        _same_device(src=src, taps=taps)
        out = src.new_empty((taps.shape[0], taps.shape[1] * src.shape[1]))
        run("gather_rows", out.numel(), src, taps, out, src.shape[1])
        return out

    def depthwise_rows(src, idx, size, weight, bias, norm_eps=None):
        kernel = _depthwise_checks(src, idx, size, weight, bias)
        out = src.new_empty((idx.shape[0], src.shape[1]))
        run("depthwise_rows", out.numel(), src, idx, weight, bias, out, size[1], size[2], kernel, src.shape[1])
        return out if norm_eps is None else F.layer_norm(out, out.shape[1:], eps=norm_eps)  # the spec's norm

    def bias_relu_(rows, bias):
        _bias_checks(rows, bias)
        run("bias_relu", rows.numel(), rows, bias, rows.shape[1])
        return rows

    def linear(rows, layer, relu):
        # With ReLU: the GEMM alone, then bias and ReLU in one pass of the fused kernel (addmm would first copy the
        # bias into the output, and relu_ would be a second pass). Without: addmm, whose bias copy is that one pass.
        if relu:
            return bias_relu_(torch.mm(rows, layer.matrix), layer.bias)
        return torch.addmm(layer.bias, rows, layer.matrix)

    return Ops(gather_rows=gather_rows, gather_patches=gather_patches, depthwise_rows=depthwise_rows,
               gather_channels=_gather_channels_op(run), bias_relu_=bias_relu_,
               scatter_rows_=_scatter_op(run, "scatter_rows"), scatter_add_=_scatter_op(run, "scatter_add"),
               scatter_add_relu_=_scatter_op(run, "scatter_add_relu"), linear=linear)


# ---- the CuPy launcher ----

_kernels = {}  # name -> cupy.RawKernel; CuPy compiles and loads it once per device (and caches it on disk)


def _kernel(name):
    import cupy

    if name not in _kernels:
        _kernels[name] = cupy.RawModule(code=_SOURCES[name], options=COMPILE_OPTIONS).get_function(name)
    return _kernels[name]


def _cupy_launch(name, total, *args):
    device = next(a.device for a in args if isinstance(a, torch.Tensor))
    if device.type != "cuda":
        raise ValueError(f"the cupy backend needs CUDA tensors, got tensors on {device}")
    import cupy

    grid, block = launch_config(total)
    with cupy.cuda.Device(device.index):
        # torch's current stream, so the kernel is ordered with the torch work around it without a sync.
        # (cupy.cuda.ExternalStream is deprecated in CuPy 14; torch streams speak the __cuda_stream__ protocol.)
        with cupy.cuda.Stream.from_external(torch.cuda.current_stream(device)):
            # Zero-copy views through __cuda_array_interface__ (detach: torch refuses it on tensors requiring grad).
            kernel_args = tuple(cupy.asarray(a.detach()) if isinstance(a, torch.Tensor) else cupy.int64(a)
                                for a in args + (total,))
            _kernel(name)(grid, block, kernel_args)


OPS = make_ops(_cupy_launch)
