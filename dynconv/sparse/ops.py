"""The gather/scatter operations of sparse execution, behind one dispatching API.

Every feature map is position-major: a (rows, channels) float32 matrix, one row per pixel of an NHWC map
(flattened over batch, height and width), contiguous. Index vectors are int64 row numbers.

Backends:
- "torch": pure PyTorch tensor ops, any device. It is the specification the other backend is tested against.
- "cupy": CUDA C kernels compiled by CuPy at run time (dynconv/sparse/cuda_kernels.py); CUDA tensors only.
Matrix products go through torch (MKL/oneDNN on CPU, cuBLAS on GPUs) in both.
"""
import functools

import torch

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


@functools.lru_cache(maxsize=64)
def patch_offsets(padded_width, device):
    """Row offsets of the 3x3 taps (row-major: dy, then dx) from a window's top-left row in a padded map."""
    return torch.tensor([dy * padded_width + dx for dy in range(3) for dx in range(3)], device=device)


def gather_patches(src, base, padded_width):
    """3x3 neighbourhoods from a zero-padded map: out[k, t*C + c] = src[base[k] + (t // 3) * Wp + t % 3, c].

    src: (N * Hp * Wp, C) rows of the padded map; base: the row of each window's top-left tap; -> (K, 9C)."""
    rows = (base[:, None] + patch_offsets(padded_width, base.device)[None, :]).reshape(-1)
    return src.index_select(0, rows).reshape(base.shape[0], 9 * src.shape[1])


def bias_relu_(rows, bias):
    """rows = max(rows + bias, 0), in place (the BatchNorm folded into the preceding conv, then ReLU)."""
    return rows.add_(bias).relu_()


def scatter_rows_(dst, idx, rows):
    """dst[idx[k], :] = rows[k, :] (idx without repeats)."""
    dst.index_copy_(0, idx, rows)
    return dst


def scatter_add_relu_(dst, idx, rows):
    """dst[idx[k], :] = max(dst[idx[k], :] + rows[k, :], 0): the masked residual add and its ReLU (idx without
    repeats). Precondition: dst is non-negative outside idx (a ReLU output), so this version can apply the ReLU
    to the whole map: one pass, cheaper than selecting the rows (a gather, an add and a scatter)."""
    return dst.index_add_(0, idx, rows).relu_()


def linear(rows, weight, bias, relu):
    """rows @ weight + bias (then ReLU): a conv at the gathered positions with BatchNorm folded in."""
    out = torch.addmm(bias, rows, weight)
    return out.relu_() if relu else out


TORCH_OPS = dict(gather_rows=gather_rows, gather_patches=gather_patches, bias_relu_=bias_relu_,
                 scatter_rows_=scatter_rows_, scatter_add_relu_=scatter_add_relu_, linear=linear)


def get_ops(backend):
    """The op table of a resolved backend name."""
    if backend == "cupy":
        from . import cuda_kernels

        return cuda_kernels.OPS
    return TORCH_OPS
