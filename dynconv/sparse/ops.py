"""The gather/scatter operations of sparse execution, behind one dispatching API.

Ops (the same names and signatures in every backend's table; a trailing underscore: in place, returns its first
argument): gather_rows(src, idx), gather_patches(src, taps) for any tap count, depthwise_rows(src, idx, size,
weight, bias, norm_eps=None) (a depthwise k x k conv at chosen positions, its rows optionally layer-normalised),
gather_channels(src, idx, positions) (each image's chosen channels per group), bias_relu_(rows, bias),
scatter_rows_(dst, idx, rows),
scatter_add_(dst, idx, rows) (the residual add of a block with no activation after it), scatter_add_relu_(dst, idx,
rows), linear(rows, layer, relu) (layer: a RowLinear, dynconv/sparse/linear.py).

Every feature map is position-major: a (rows, channels) float32 matrix, one row per pixel of an NHWC map
(flattened over batch, height and width), contiguous. Index vectors are int64 row numbers.

Backends:
- "torch": pure PyTorch tensor ops, any device. It is the specification the other backend is tested against.
- "cupy": CUDA C kernels compiled by CuPy at run time (dynconv/sparse/cuda_kernels.py); CUDA tensors only.
Matrix products go through torch (oneDNN with prepacked weights, else BLAS, on CPUs; cuBLAS on GPUs) in both.
"""
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F

from .. import fused

BACKENDS = ("auto", "torch", "cupy")


def cupy_available():
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(name, device):
    """'auto' = cupy for CUDA tensors when CuPy imports, torch otherwise; an impossible request is an error."""
    if name not in BACKENDS:
        raise ValueError(f"unknown sparse backend '{name}' (choices: {', '.join(BACKENDS)})")
    device = torch.device(device)
    if name == "auto":
        return "cupy" if device.type == "cuda" and cupy_available() else "torch"
    if name == "cupy":
        if device.type != "cuda":
            raise ValueError(f"the cupy backend needs CUDA tensors (the model is on {device}); use --backend torch")
        if not torch.cuda.is_available():
            raise ValueError("the cupy backend needs a CUDA GPU and none is available; use --backend torch")
        if not cupy_available():
            raise ValueError("the cupy backend needs CuPy (pip install cupy-cuda13x); use --backend torch")
    return name


# ---- torch backend: the specification ----

def gather_rows(src, idx):
    """out[k, :] = src[idx[k], :]."""
    return src.index_select(0, idx)


def gather_patches(src, taps):
    """Neighbourhoods of T taps (9 for a 3x3 kernel, 49 for 7x7, 1 for 1x1): out[k, t*C + c] = src[taps[k, t], c];
    taps (K, T) int64 rows, taps (dy, dx) row-major (outside the map: a zero row of src). -> (K, T*C), the im2col
    rows of K output pixels."""
    return src.index_select(0, taps.reshape(-1)).reshape(taps.shape[0], taps.shape[1] * src.shape[1])


def depthwise_rows(src, idx, size, weight, bias, norm_eps=None):
    """A depthwise k x k conv (stride 1, padding k // 2, with bias) of the map `src` (N*H*W, C) of size (N, H, W),
    at the output positions idx only: out[j, c] = bias[c] + sum over taps t = (dy, dx) of weight[t, c] *
    src[neighbour t of idx[j], c] (zero outside the map); weight (k*k, C), taps (dy, dx) row-major. -> (len(idx), C).
    norm_eps: each row then layer-normalised without affine (F.layer_norm with that eps).

    On CPUs, float32: the fused C++ kernel (dynconv/fused), which computes only those rows. Otherwise the whole map
    through oneDNN / cuDNN's depthwise conv, keeping the rows: about 10x faster on the development CPU than
    gathering the 49-tap neighbourhoods of 30% of the positions, and the depthwise conv is a few per cent of a
    ConvNeXt block's MACs. The CUDA kernel computes only the rows."""
    if fused.rows_usable(src, weight, bias):
        return fused.depthwise_rows(src, idx, size, weight, bias, norm_eps)
    n, h, w = size
    channels, kernel = src.shape[1], math.isqrt(weight.shape[0])
    dense = F.conv2d(src.view(n, h, w, channels).permute(0, 3, 1, 2),
                     weight.t().reshape(channels, 1, kernel, kernel), bias, padding=kernel // 2, groups=channels)
    out = dense.permute(0, 2, 3, 1).reshape(-1, channels).index_select(0, idx)
    return out if norm_eps is None else F.layer_norm(out, out.shape[1:], eps=norm_eps)


def gather_channels(src, idx, positions):
    """Each image's chosen channels, per group: out[n, g, p, k] = src[n * P + p, idx[n, g, k]] for the map `src`
    (N * P, C) of N images with P positions each and idx (N, G, K). -> (N, G, P, K), the input rows of G convs
    that each read K channels (e.g. the heads of a dynamic group convolution)."""
    n, groups, kept = idx.shape
    maps = src.view(n, 1, positions, src.shape[1]).expand(n, groups, positions, src.shape[1])
    return maps.gather(3, idx[:, :, None, :].expand(n, groups, positions, kept))


def bias_relu_(rows, bias):
    """rows = max(rows + bias, 0), in place (the BatchNorm folded into the preceding conv, then ReLU)."""
    return rows.add_(bias).relu_()


def scatter_rows_(dst, idx, rows):
    """dst[idx[k], :] = rows[k, :] (idx without repeats). On CPUs, float32: the fused C++ kernel (dynconv/fused),
    one copy per row."""
    if fused.rows_usable(dst, rows):
        return fused.scatter_rows_(dst, idx.contiguous(), rows)
    dst.index_copy_(0, idx, rows)
    return dst


def scatter_add_(dst, idx, rows):
    """dst[idx[k], :] += rows[k, :] (idx without repeats): the masked residual add of a block with no activation
    after it (ConvNeXt). On CPUs, float32: the fused C++ kernel (dynconv/fused), one pass over the rows idx."""
    if fused.rows_usable(dst, rows):
        return fused.scatter_add_rows_(dst, idx.contiguous(), rows)
    return dst.index_add_(0, idx, rows)


def scatter_add_relu_(dst, idx, rows):
    """dst[idx[k], :] = max(dst[idx[k], :] + rows[k, :], 0): the masked residual add and its ReLU (idx without
    repeats). Precondition: dst is non-negative outside idx (a ReLU output), so this version can apply the ReLU
    to the whole map: one pass, cheaper than selecting the rows (a gather, an add and a scatter). On CPUs, float32:
    the fused C++ kernel (dynconv/fused), which adds and clips the rows idx only, in one pass."""
    if fused.rows_usable(dst, rows):
        return fused.scatter_add_relu_rows_(dst, idx.contiguous(), rows)
    return dst.index_add_(0, idx, rows).relu_()


def linear(rows, layer, relu):
    """rows @ layer.matrix + layer.bias (then ReLU), layer a RowLinear: a conv at the gathered positions with
    BatchNorm folded in, or a Linear; through oneDNN's prepacked weight where the layer has one and the product is
    big enough for it (RowLinear.runs_onednn)."""
    if layer.runs_onednn(rows.shape[0]):
        return torch.ops.mkldnn._linear_pointwise(rows, layer.packed, layer.bias, "relu" if relu else "none", [], "")
    out = torch.addmm(layer.bias, rows, layer.matrix)
    return out.relu_() if relu else out


@dataclass(frozen=True)
class Ops:
    """A backend's op table: the same functions, by name and signature, in every backend (the torch functions
    above are the specification); plans call them as attributes (`ops.gather_rows(src, idx)`)."""

    gather_rows: Callable
    gather_patches: Callable
    depthwise_rows: Callable
    gather_channels: Callable
    bias_relu_: Callable
    scatter_rows_: Callable
    scatter_add_: Callable
    scatter_add_relu_: Callable
    linear: Callable

    def items(self):
        """(name, function) pairs, in declaration order."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


TORCH_OPS = Ops(gather_rows=gather_rows, gather_patches=gather_patches, depthwise_rows=depthwise_rows,
                gather_channels=gather_channels, bias_relu_=bias_relu_, scatter_rows_=scatter_rows_,
                scatter_add_=scatter_add_, scatter_add_relu_=scatter_add_relu_, linear=linear)


def get_ops(backend):
    """The op table of a resolved backend name."""
    if backend == "cupy":
        from . import cuda_kernels

        return cuda_kernels.OPS
    return TORCH_OPS
