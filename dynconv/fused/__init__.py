"""Fused CPU kernels: for DynConv training the masked residual add + ReLU, forward and backward; for the sparse
engine a depthwise conv at chosen positions (`depthwise_rows`, ConvNeXt blocks), row copies into a map
(`scatter_rows_`) and the masked residual add, with or without its ReLU, on the chosen rows only
(`scatter_add_relu_rows_`, ResNet blocks; `scatter_add_rows_`, ConvNeXt blocks); in evaluation, a mask unit's
tile logits without its per-position map (`tile_logits`) and its masks and index lists from them (`tile_masks`).

Training computes every block densely (as the reference does), so the method's own cost is memory traffic.
The block output relu(identity + mask * residual) takes two passes over the activations with ATen ops, and its
backward four (ReLU's gradient, times the mask, times the residual, summed over channels for the mask's
gradient); `cpu_kernels.cpp` does each in one pass over channels-last maps.

The kernels are compiled on first use with torch.utils.cpp_extension (needs a C++ compiler and ninja; ~15 s,
cached under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). Where that fails (one warning), for non-CPU,
non-float or non-channels-last tensors, or with DYNCONV_FUSED=0, the eager ops run instead:
relu(addcmul(identity, residual, mask)), the specification the tests hold the kernels to.
"""
import functools
import logging
import os
import sys
import warnings

import torch

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cpp")


@functools.lru_cache(maxsize=None)
def _load():
    """Builds and loads the kernels once per process; False (with one warning) when they cannot be built."""
    try:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" is noise here
        from torch.utils.cpp_extension import _get_build_directory, load

        build_dir = _get_build_directory("dynconv_fused", verbose=False)
        if not os.path.isfile(os.path.join(build_dir, "dynconv_fused.so")):
            print(f"building DynConv's fused CPU kernels (once, ~15 s; cached in {build_dir})", file=sys.stderr,
                  flush=True)
        # -fopenmp: at::parallel_for is an OpenMP pragma in the headers, ignored (one thread) without it
        load(name="dynconv_fused", sources=[_SOURCE], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
             is_python_module=False)
        return True
    except Exception as error:  # no compiler, no ninja, read-only cache: fall back to the eager ops
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        warnings.warn(f"DynConv's fused CPU kernels could not be built ({first_line}); training uses the slower "
                      "eager ops", stacklevel=2)
        return False


@functools.lru_cache(maxsize=None)  # the engine calls a few kernels per block: no lookups on the way
def _ops():
    """The kernels' op namespace (torch.ops.dynconv_fused), built if need be."""
    if not _load():
        raise RuntimeError("DynConv's fused CPU kernels are not available (see the warning above)")
    return torch.ops.dynconv_fused


def usable(*tensors):
    """Whether the fused kernels can run on these tensors (CPU, float32/64, channels-last 4-d)."""
    if os.environ.get("DYNCONV_FUSED", "1") == "0":
        return False
    for t in tensors:
        if (t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.dim() != 4
                or not t.is_contiguous(memory_format=torch.channels_last)):
            return False
    return _load()


def rows_usable(*tensors):
    """Whether the engine's row kernels can run on these tensors (CPU, float32, contiguous)."""
    if os.environ.get("DYNCONV_FUSED", "1") == "0":
        return False
    if any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
        return False
    return _load()


def depthwise_rows(src, idx, size, weight, bias, norm_eps=None):
    """ops.depthwise_rows computed at the positions idx only (the dense spec computes the whole map): about 3x
    less time for ConvNeXt-T's stage-1 blocks at 30% of the positions, batch 1, on the development CPU; with
    norm_eps, each row layer-normalised in the same pass."""
    return _ops().depthwise_rows(src, idx, size[1], size[2], weight, bias, -1.0 if norm_eps is None else norm_eps)


def scatter_rows_(dst, idx, rows):
    """ops.scatter_rows_ (dst[idx] = rows), one copy per row, in place: 3-6x faster than index_copy_ on the
    engine's ResNet buffers."""
    return _ops().scatter_rows(dst, idx, rows, False, False)


def scatter_add_relu_rows_(dst, idx, rows):
    """ops.scatter_add_relu_ on the rows idx only (the eager ops apply the ReLU to the whole map), in place."""
    return _ops().scatter_rows(dst, idx, rows, True, True)


def scatter_add_rows_(dst, idx, rows):
    """ops.scatter_add_ (dst[idx] += rows) in one pass over the rows idx, in place."""
    return _ops().scatter_rows(dst, idx, rows, True, False)


def tile_logits(x, class_weights, fc, constant, stride, tile, out_size):
    """MaskLogits.tile_logits in one pass over x (channels-last float32): per tile, one dot product per pixel of
    its input window with the weights of the taps that reach it (`class_weights`, MaskLogits.tile_weights)."""
    return _ops().tile_logits(x, class_weights, fc, constant, stride, tile, *out_size)


def tile_masks(logits, tile, out_size, dilate_stride=0, dilated_size=(0, 0)):
    """A tiled mask unit's (hard, dilated, positions) in evaluation from its tile logits (N, 1, grid_h, grid_w):
    the threshold, the tiles expanded to out_size and (dilate_stride > 0) the 3x3 dilation at that stride cropped
    to dilated_size, in one op (MaskUnit.decide's ATen ops are the spec); dilated is None when not asked for.
    positions: (hard, dilated) index lists, the flat indices of their ones (as mask.reshape(-1).nonzero()),
    dilated's None without it."""
    out = _ops().tile_masks(logits, tile, *out_size, dilate_stride, *dilated_size)
    if len(out) == 2:
        return out[0], None, (out[1], None)
    return out[0], out[1], (out[2], out[3])


class FusedMaskedResidualReLU(torch.autograd.Function):
    """relu(identity + hard * residual), with hard (N, 1, H, W) broadcast over channels."""

    @staticmethod
    def forward(ctx, identity, residual, hard):
        out = _ops().masked_residual_relu(identity, residual, hard)
        ctx.save_for_backward(out, residual, hard)
        return out

    @staticmethod
    def backward(ctx, grad):
        out, residual, hard = ctx.saved_tensors
        grad_identity, grad_residual, grad_hard = _ops().masked_residual_relu_backward(
            grad, out, residual, hard)
        return grad_identity, grad_residual, grad_hard.view_as(hard)
