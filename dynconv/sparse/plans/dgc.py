"""Engine plan of a dynamic group convolution (models/dgc.py's DGCConv): each head convolves only the input
channels it kept for the image, with the matching slice of its weights, instead of every channel times a saliency
of zero.

Per image n and head h with kept channels idx[n, h] (the K = C_in - inactive largest saliencies, from the layer's
gate; K is fixed by the trained `inactive`): the gathered weights W_h[:, idx] are scaled by the saliencies once (C_out/H x K numbers, not
the K x H x W input), then
- the kept channels are gathered position-major by the backend's `gather_channels` op (torch, or a CuPy kernel);
- 1x1 convs: one batched matrix product over images and heads, (positions, K) @ (K, C_out/H), whose output is
  already the interleaved channels-last map;
- k x k convs: one grouped conv over the gathered inputs with N * H groups (each image and head its own weights).
BN + ReLU of the input run as in the layer (eval mode), and the saliency generator is the layer's own. Where ties
make the layer zero more than `inactive` channels, the extra gathered ones have saliency 0 here too: the same
function, and the same MACs as the layer's decision states (K channels per head). The output is interleaved as the layer's (channel j * H + h is head h's j).
"""
import torch
import torch.nn.functional as F

from . import BlockPlan


class DGCConvPlan(BlockPlan):
    def __init__(self, block, ops, settings):
        super().__init__(block, ops, settings)
        heads, c_out = block.heads, block.out_channels
        k = block.kernel_size
        # (H, C_out/H, C_in, k*k): head h's conv, indexable by input channel
        self.weight = block.weight.detach().reshape(heads, c_out // heads, block.in_channels, k * k)
        self.kept = block.in_channels - int(block.gate.inactive)

    def __call__(self, x, target=None):
        block = self.block
        x = block.relu(block.norm(x)).contiguous(memory_format=torch.channels_last)
        saliency, kept, raw, idx = block.gate(x.mean((2, 3)), target)  # idx (N, H, K): the channels read
        decision = block.decision(kept, raw, x)
        heads = torch.arange(block.heads, device=x.device)[None, :, None]
        # (N, H, C_out/H, K, k*k): each image's and head's weights at its kept channels, times their saliencies
        weight = self.weight[heads, :, idx].transpose(2, 3) * saliency.gather(2, idx)[:, :, None, :, None]
        if block.kernel_size == 1:
            out = self._pointwise(x, idx, weight)
        else:
            out = self._grouped(x, idx, weight)
        return out, decision

    def _rows(self, x, idx):
        """(N, H, positions, K): every image's and head's kept channels, position-major (channels-last map)."""
        n, c, height, width = x.shape
        return self.ops["gather_channels"](x.permute(0, 2, 3, 1).reshape(n * height * width, c), idx,
                                           height * width)

    def _pointwise(self, x, idx, weight):
        stride = self.block.stride
        if stride > 1:
            x = x[..., ::stride, ::stride].contiguous(memory_format=torch.channels_last)
        n, _, height, width = x.shape
        out = torch.matmul(self._rows(x, idx), weight[..., 0].transpose(2, 3))  # (N, H, positions, C_out/H)
        # channel j * H + h is head h's j: (N, positions, C_out/H, H) is the interleaved channels-last map
        return out.permute(0, 2, 3, 1).reshape(n, height, width, -1).permute(0, 3, 1, 2)

    def _grouped(self, x, idx, weight):
        block = self.block
        n, _, height, width = x.shape
        heads, kept, k = block.heads, self.kept, block.kernel_size
        inputs = self._rows(x, idx).transpose(2, 3).reshape(1, n * heads * kept, height, width)
        out = F.conv2d(inputs, weight.reshape(-1, kept, k, k), None, block.stride, block.padding, groups=n * heads)
        out = out.reshape(n, heads, -1, *out.shape[-2:])
        return out.transpose(1, 2).reshape(n, -1, *out.shape[-2:]).contiguous(memory_format=torch.channels_last)
