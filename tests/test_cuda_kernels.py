"""The cupy backend (dynconv/sparse/cuda_kernels.py) against the torch backend, the specification.

Without a GPU: the kernel sources compile with NVRTC, and run on the CPU (tests/cuda_emulation.py) through the
backend's own host code. With a GPU, the real CuPy launches are tested too.
"""
import inspect
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cuda_emulation import EmulatedKernels
from dynconv.sparse import cuda_kernels, ops
from dynconv.sparse.cuda_kernels import kernel_sources
from dynconv.sparse.layout import tap_table, with_zero_row
from dynconv.sparse.linear import RowLinear

KERNELS = sorted(kernel_sources())
NUM_ROWS = (0, 1, 7, 133)  # K, the length of the index list
CHANNELS = (1, 3, 17, 64)
TAPS = (1, 9, 49)  # taps per window: 1x1, 3x3 and 7x7 kernels
SCATTERS = ("scatter_rows_", "scatter_add_", "scatter_add_relu_")


@pytest.fixture(scope="module")
def emulated():
    return EmulatedKernels(kernel_sources()).ops()


def random_rows(rows, channels, generator):
    return torch.randn(rows, channels, generator=generator)


def tap_tables(windows, taps, num_rows, generator):
    """(windows, taps) random tap rows into a map of num_rows rows followed by its zero row (index num_rows); the
    last tap of the first window is always the zero row."""
    table = torch.randint(num_rows + 1, (windows, taps), generator=generator)
    table[:1, -1] = num_rows
    return table


# ---- a. NVRTC: the sources compile for real GPUs ----

# Run in a child process: loading NVRTC into the test process corrupted later torch.save archives in the same
# process (seen on this GPU-less machine), so the compiler stays out of the process that runs the other tests.
NVRTC_SCRIPT = r"""
import json, sys
from cuda.bindings import nvrtc
from dynconv.sparse.cuda_kernels import COMPILE_OPTIONS, kernel_sources

results = {}
for name, source in kernel_sources().items():
    for arch in ("sm_80", "sm_90"):
        _, prog = nvrtc.nvrtcCreateProgram(source.encode(), f"{name}.cu".encode(), 0, [], [])
        options = [o.encode() for o in COMPILE_OPTIONS + (f"--gpu-architecture={arch}",)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        ptx = b""
        if err == nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetPTXSize(prog)
            ptx = b" " * size
            nvrtc.nvrtcGetPTX(prog, ptx)
        nvrtc.nvrtcDestroyProgram(prog)
        results[f"{name}/{arch}"] = {"ok": err == nvrtc.nvrtcResult.NVRTC_SUCCESS, "error": str(err),
                                     "log": log.rstrip(b"\0 ").decode(), "ptx_size": len(ptx),
                                     "entry": f".entry {name}(".encode() in ptx}
json.dump(results, sys.stdout)
"""


@pytest.fixture(scope="module")
def nvrtc_results():
    pytest.importorskip("cuda.bindings.nvrtc")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", NVRTC_SCRIPT], cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", KERNELS)
def test_nvrtc_compiles(nvrtc_results, name, arch):
    result = nvrtc_results[f"{name}/{arch}"]
    assert result["ok"], f"{name} does not compile for {arch} ({result['error']}):\n{result['log']}"
    assert result["ptx_size"] > 0
    # extern "C": the entry point keeps the plain name that the launcher looks up.
    assert result["entry"]


# ---- b. the emulated kernels equal the torch ops ----

@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("k", NUM_ROWS)
def test_gather_rows(emulated, k, channels):
    g = torch.Generator().manual_seed(k * 100 + channels)
    src = random_rows(50, channels, g)
    idx = torch.randint(50, (k,), generator=g)  # repeats are fine in a gather
    out = emulated.gather_rows(src, idx)
    assert torch.equal(out, ops.gather_rows(src, idx))


@pytest.mark.parametrize("taps_per_window", TAPS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("k", NUM_ROWS)
def test_gather_patches(emulated, k, channels, taps_per_window):
    g = torch.Generator().manual_seed(k * 100 + channels + taps_per_window)
    src = torch.cat([random_rows(40, channels, g), torch.zeros(1, channels)])
    taps = tap_tables(k, taps_per_window, 40, g)
    expected = ops.gather_patches(src, taps)
    # the spec itself, against advanced indexing: (K, T, C) windows, flattened tap-major
    assert expected.shape == (k, taps_per_window * channels)
    assert torch.equal(expected.reshape(k, taps_per_window, channels), src[taps])
    out = emulated.gather_patches(src, taps)
    assert torch.equal(out, expected)
    if k:  # the zero row convention: a tap outside the map reads zeros
        assert torch.equal(out[0, -channels:], torch.zeros(channels))


def depthwise_case(kernel, channels, k, seed):
    """A (2, 5, 6) map as rows, k positions (repeats allowed), tap-major weights and a bias."""
    g = torch.Generator().manual_seed(seed)
    src = random_rows(2 * 5 * 6, channels, g)
    idx = torch.randint(2 * 5 * 6, (k,), generator=g)
    return src, idx, (2, 5, 6), torch.randn(kernel * kernel, channels, generator=g), torch.randn(channels, generator=g)


@pytest.mark.parametrize("cpu_kernel", ["1", "0"], ids=["fused-cpu-kernel", "dense-conv"])
@pytest.mark.parametrize("kernel", [1, 3, 7])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("k", NUM_ROWS)
def test_depthwise_rows(emulated, k, channels, kernel, cpu_kernel, monkeypatch):
    """The torch op, on both its CPU paths (DYNCONV_FUSED), and the CUDA kernel."""
    monkeypatch.setenv("DYNCONV_FUSED", cpu_kernel)
    src, idx, size, weight, bias = depthwise_case(kernel, channels, k, k * 100 + channels + kernel)
    expected = ops.depthwise_rows(src, idx, size, weight, bias)
    # the spec against a second implementation: the gathered neighbourhoods (tap table, zero row) times the taps
    n, h, w = size
    taps = tap_table(n, h, w, 1, h, w, kernel, kernel // 2).index_select(0, idx)
    patches = ops.gather_patches(with_zero_row(src), taps).view(k, kernel * kernel, channels)
    torch.testing.assert_close(expected, (patches * weight).sum(1) + bias)
    torch.testing.assert_close(emulated.depthwise_rows(src, idx, size, weight, bias), expected)
    # with the rows layer-normalised (ConvNeXt's LayerNorm in the same pass on CPUs)
    normed = F.layer_norm(expected, expected.shape[1:], eps=1e-6)
    torch.testing.assert_close(ops.depthwise_rows(src, idx, size, weight, bias, 1e-6), normed, rtol=1e-4,
                               atol=1e-5)
    torch.testing.assert_close(emulated.depthwise_rows(src, idx, size, weight, bias, 1e-6), normed, rtol=1e-4,
                               atol=1e-5)


def channel_case(images, groups, kept, positions, channels, g):
    src = random_rows(images * positions, channels, g)
    idx = torch.stack([torch.stack([torch.randperm(channels, generator=g)[:kept] for _ in range(groups)])
                       for _ in range(images)]) if images else torch.zeros(0, groups, kept, dtype=torch.long)
    return src, idx, positions


@pytest.mark.parametrize("images,groups,kept,positions,channels", [
    (1, 1, 1, 1, 1), (3, 4, 5, 7, 12), (2, 2, 16, 9, 16), (0, 4, 3, 5, 8), (5, 1, 33, 3, 64)])
def test_gather_channels(emulated, images, groups, kept, positions, channels):
    g = torch.Generator().manual_seed(images * 1000 + kept * 10 + channels)
    case = channel_case(images, groups, kept, positions, channels, g)
    out = emulated.gather_channels(*case)
    assert torch.equal(out, ops.gather_channels(*case))
    src, idx, _ = case
    if images:  # the spec itself, one element by hand
        n, h, p, k = images - 1, groups - 1, positions - 1, kept - 1
        assert out[n, h, p, k] == src[n * positions + p, idx[n, h, k]]


def test_gather_channels_checks(emulated):
    with pytest.raises(ValueError, match="expected 2 images x 3 positions"):
        emulated.gather_channels(torch.randn(5, 4), torch.zeros(2, 1, 1, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="idx must be 3-D"):
        emulated.gather_channels(torch.randn(6, 4), torch.zeros(2, 1, dtype=torch.long), 3)


def test_depthwise_rows_checks(emulated):
    src, idx, size, weight, bias = depthwise_case(3, 4, 5, 0)
    with pytest.raises(ValueError, match="k \\* k rows"):
        emulated.depthwise_rows(src, idx, size, weight[:8].contiguous(), bias)
    with pytest.raises(ValueError, match="N \\* H \\* W = 60 rows"):
        emulated.depthwise_rows(src[:59].contiguous(), idx, size, weight, bias)
    with pytest.raises(ValueError, match="equal src's 4 channels"):
        emulated.depthwise_rows(src, idx, size, weight, bias[:3])


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel_size", [1, 3, 7])
def test_gather_patches_are_neighbourhoods(kernel_size, stride):
    """Through the layout's tap table, patches of a real NHWC map are its zero-padded k x k neighbourhoods ("same"
    padding), taps row-major then channels."""
    from dynconv.sparse.layout import tap_table, with_zero_row

    g = torch.Generator().manual_seed(kernel_size * 10 + stride)
    n, h, w, c, pad = 2, 7, 5, 3, kernel_size // 2
    image = torch.randn(n, h, w, c, generator=g)
    padded = torch.nn.functional.pad(image, (0, 0, pad, pad, pad, pad))  # (n, h + 2 pad, w + 2 pad, c)
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    table = tap_table(n, out_h, out_w, stride, h, w, kernel_size, pad, "cpu")
    patches = ops.gather_patches(with_zero_row(image.reshape(-1, c)), table)
    assert patches.shape == (n * out_h * out_w, kernel_size * kernel_size * c)
    for b in range(n):
        for y in range(out_h):
            for x in range(out_w):
                window = padded[b, stride * y:stride * y + kernel_size, stride * x:stride * x + kernel_size, :]
                assert torch.equal(patches[(b * out_h + y) * out_w + x], window.reshape(-1))


@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("k", NUM_ROWS)
def test_bias_relu(emulated, k, channels):
    g = torch.Generator().manual_seed(k * 100 + channels)
    rows = random_rows(k + 2, channels, g)
    if k:
        rows[1, 0] = float("nan")  # propagates, as in torch
    bias = torch.randn(channels, generator=g)
    expected = ops.bias_relu_(rows[1:-1].clone(), bias)
    before = rows.clone()
    out = emulated.bias_relu_(rows[1:-1], bias)  # a view inside a larger buffer: nothing outside it changes
    assert out.data_ptr() == rows[1:-1].data_ptr()
    torch.testing.assert_close(out, expected, equal_nan=True)
    assert torch.equal(rows[[0, -1]], before[[0, -1]])


@pytest.mark.parametrize("op", SCATTERS)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("k", NUM_ROWS)
def test_scatters(emulated, op, k, channels):
    g = torch.Generator().manual_seed(k * 100 + channels)
    m = 140
    buffer = random_rows(m + 2, channels, g)
    if op == "scatter_add_relu_":
        buffer = buffer.abs()  # its precondition: a non-negative map
    idx = torch.randperm(m, generator=g)[:k]
    rows = random_rows(k, channels, g)
    expected = getattr(ops, op)(buffer[1:-1].clone(), idx, rows)
    before = buffer.clone()
    out = getattr(emulated, op)(buffer[1:-1], idx, rows)  # dst inside a larger buffer: catches writes past its ends
    assert out.data_ptr() == buffer[1:-1].data_ptr()
    if op == "scatter_add_relu_":
        torch.testing.assert_close(out, expected)
    else:  # one float store or add per element: exact
        assert torch.equal(out, expected)
    if op == "scatter_add_" and k * channels > 8:  # negative sums survive: no ReLU slipped in
        assert (out[idx] < 0).any()
    assert torch.equal(buffer[[0, -1]], before[[0, -1]])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("k", NUM_ROWS)
def test_linear(emulated, k, relu):
    g = torch.Generator().manual_seed(k)
    rows, layer = random_rows(k, 27, g), RowLinear(torch.randn(17, 27, generator=g), torch.randn(17, generator=g))
    expected = rows @ layer.matrix + layer.bias
    expected = expected.relu() if relu else expected
    torch.testing.assert_close(emulated.linear(rows, layer, relu), expected)
    torch.testing.assert_close(ops.linear(rows, layer, relu), expected)


def test_input_checks(emulated):
    src, idx = torch.randn(10, 4), torch.arange(3)
    with pytest.raises(ValueError, match="src must be torch.float32"):
        emulated.gather_rows(src.double(), idx)
    with pytest.raises(ValueError, match="idx must be torch.int64"):
        emulated.gather_rows(src, idx.int())
    with pytest.raises(ValueError, match="src must be contiguous"):
        emulated.gather_rows(src.t(), idx)
    with pytest.raises(ValueError, match="taps must be 2-D"):
        emulated.gather_patches(src, idx)
    with pytest.raises(ValueError, match="taps must be torch.int64"):
        emulated.gather_patches(src, idx[None].int())
    with pytest.raises(ValueError, match="taps must be contiguous"):
        emulated.gather_patches(src, torch.zeros(9, 3, dtype=torch.int64).t())
    with pytest.raises(ValueError, match="different devices"):
        emulated.gather_rows(src, idx.to("meta"))
    with pytest.raises(ValueError, match="bias must have 4 entries"):
        emulated.bias_relu_(src, torch.zeros(3))


def bad_scatter_inputs():
    """{case: (dst, idx, rows, error message)}: what every scatter op must reject before launching."""
    dst, idx, rows = torch.randn(10, 4), torch.arange(3), torch.randn(3, 4)
    shape = r"rows must be \(len\(idx\), dst columns\)"
    return {"dst dtype": (dst.double(), idx, rows, "dst must be torch.float32"),
            "idx dtype": (dst, idx.int(), rows, "idx must be torch.int64"),
            "rows dtype": (dst, idx, rows.half(), "rows must be torch.float32"),
            "dst strided": (torch.randn(4, 10).t(), idx, rows, "dst must be contiguous"),
            "idx strided": (dst, torch.arange(6)[::2], rows, "idx must be contiguous"),
            "rows strided": (dst, idx, torch.randn(4, 3).t(), "rows must be contiguous"),
            "idx 2-D": (dst, idx[None], rows, "idx must be 1-D"),
            "rows columns": (dst, idx, torch.randn(3, 5), shape),
            "rows count": (dst, idx, torch.randn(2, 4), shape),
            "devices": (dst, idx.to("meta"), rows, "different devices"),
            "rows alias dst": (dst, idx, dst[5:8], "must not share memory")}


@pytest.mark.parametrize("case", sorted(bad_scatter_inputs()))
@pytest.mark.parametrize("op", SCATTERS)
def test_scatter_input_checks(emulated, op, case):
    dst, idx, rows, message = bad_scatter_inputs()[case]
    before = dst.clone()
    with pytest.raises(ValueError, match=message):
        getattr(emulated, op)(dst, idx, rows)
    assert torch.equal(dst, before)


def test_op_tables_match():
    """The cupy table has the spec's ops, with the same parameters."""
    assert isinstance(cuda_kernels.OPS, ops.Ops) and isinstance(ops.TORCH_OPS, ops.Ops)
    for name, op in ops.TORCH_OPS.items():
        assert list(inspect.signature(getattr(cuda_kernels.OPS, name)).parameters) == list(inspect.signature(op).parameters)


def test_ops_launch_every_compiled_kernel():
    """Each op runs its own kernel, and every kernel (each one compiled by test_nvrtc_compiles) serves an op."""
    launched = []
    table = cuda_kernels.make_ops(lambda name, total, *args: launched.append(name))
    src, idx, rows = torch.randn(5, 2), torch.arange(2), torch.randn(2, 2)
    table.gather_rows(src, idx)
    table.gather_patches(src, idx[:, None])
    table.depthwise_rows(src[:4].contiguous(), idx, (1, 2, 2), torch.randn(9, 2), torch.zeros(2))
    table.gather_channels(src[:4].contiguous(), idx.reshape(2, 1, 1), 2)
    table.bias_relu_(rows, torch.zeros(2))
    for op in SCATTERS:
        getattr(table, op)(src, idx, rows)
    assert launched == ["gather_rows", "gather_rows", "depthwise_rows", "gather_channels", "bias_relu", "scatter_rows",
                        "scatter_add", "scatter_add_relu"]
    assert sorted(set(launched)) == KERNELS


def test_cupy_backend_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cuda_kernels.OPS.gather_rows(torch.randn(4, 2), torch.arange(2))


# ---- c. the real CuPy launches, on a GPU ----

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or not ops.cupy_available(),
                               reason="needs a CUDA GPU and CuPy")


@needs_gpu
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("k", NUM_ROWS)
def test_cupy_matches_torch(k, channels):
    g = torch.Generator().manual_seed(k * 100 + channels)
    cuda, torch_ops = cuda_kernels.OPS, ops.TORCH_OPS
    src = random_rows(50, channels, g).cuda()
    idx = torch.randint(50, (k,), generator=g).cuda()
    assert torch.equal(cuda.gather_rows(src, idx), torch_ops.gather_rows(src, idx))

    patch_src = random_rows(41, channels, g).cuda()
    for taps_per_window in TAPS:
        taps = tap_tables(k, taps_per_window, 40, g).cuda()
        assert torch.equal(cuda.gather_patches(patch_src, taps), torch_ops.gather_patches(patch_src, taps))

    rows, bias = random_rows(k, channels, g).cuda(), torch.randn(channels, generator=g).cuda()
    torch.testing.assert_close(cuda.bias_relu_(rows.clone(), bias), torch_ops.bias_relu_(rows.clone(), bias))

    dst, scatter_idx = random_rows(140, channels, g).cuda(), torch.randperm(140, generator=g)[:k].cuda()
    for op in ("scatter_rows_", "scatter_add_"):  # dst with negative entries: neither may apply a ReLU
        assert torch.equal(getattr(cuda, op)(dst.clone(), scatter_idx, rows), getattr(torch_ops, op)(dst.clone(), scatter_idx, rows))
    dst = dst.abs()  # scatter_add_relu_'s precondition: a non-negative map
    torch.testing.assert_close(cuda.scatter_add_relu_(dst.clone(), scatter_idx, rows),
                               torch_ops.scatter_add_relu_(dst.clone(), scatter_idx, rows))

    for kernel in (3, 7):
        case = [t.cuda() if isinstance(t, torch.Tensor) else t for t in depthwise_case(kernel, channels, k, k)]
        torch.testing.assert_close(cuda.depthwise_rows(*case), torch_ops.depthwise_rows(*case))

    case = [t.cuda() if isinstance(t, torch.Tensor) else t for t in channel_case(3, 4, min(k, channels), 5,
                                                                                  channels, g)]
    assert torch.equal(cuda.gather_channels(*case), torch_ops.gather_channels(*case))

    layer = RowLinear(torch.randn(5, channels, generator=g).cuda(), torch.randn(5, generator=g).cuda())
    for relu in (False, True):
        torch.testing.assert_close(cuda.linear(rows, layer, relu), torch_ops.linear(rows, layer, relu))


@needs_gpu
def test_cupy_runs_on_torch_current_stream():
    """A smoke test: on a side stream, torch work queued after the kernel sees its output."""
    g = torch.Generator().manual_seed(0)
    src, idx = random_rows(1000, 64, g).cuda(), torch.randint(1000, (5000,), generator=g).cuda()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = cuda_kernels.OPS.gather_rows(src, idx)
        doubled = out * 2
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(doubled, src[idx] * 2)


# ---- d. backend resolution ----

def test_resolve_backend():
    assert ops.resolve_backend("auto", "cpu") == "torch"
    assert ops.resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.resolve_backend("cupy", "cpu")
    with pytest.raises(ValueError, match="unknown sparse backend"):
        ops.resolve_backend("triton", "cpu")
    assert ops.get_ops("cupy") is cuda_kernels.OPS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_resolve_backend_without_gpu():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        ops.resolve_backend("cupy", "cuda")
