"""Engine plan of a dynamic group convolution (dynconv/models/dgc.py's DGCConv): each head convolves only the input
channels it kept for the image, with the matching slice of its weights, instead of every channel times a saliency
of zero.

Per image n and head h with kept channels idx[n, h] (the K = C_in - inactive largest saliencies, from the layer's
gate; K is fixed by the trained `inactive`): the gathered weights W_h[:, idx] are scaled by the saliencies once
(C_out/H x K numbers, not the K x H x W input), then
- 1x1 convs: the kept channels gathered position-major by the backend's `gather_channels` op (torch, or a CuPy
  kernel), then one batched matrix product over images and heads, (positions, K) @ (K, C_out/H), whose output
  is already the interleaved channels-last map;
- k x k convs: the kept channels of all heads gathered (torch.gather) straight into a channels-last map, then per
  image one conv with H groups over them (measured on CPU: one conv with N * H groups over the batch was no
  faster, and its channels-first input cost transposed copies).
BN + ReLU of the input run as in the layer (eval mode), and the saliency generator is the layer's own. Where ties
make the layer zero more than `inactive` channels, the extra gathered ones have saliency 0 here too: the same
function, and the same MACs as the layer's decision states (K channels per head). The output is interleaved as the
layer's (channel j * H + h is head h's j).
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
        # (N, H, C_out/H, K, k*k): each image's and head's weights at its kept channels, times their saliencies
        # (gather on the expanded weight writes this layout directly; measured faster than indexing + transposing)
        n, (_, c_out, _, taps) = len(idx), self.weight.shape
        index = idx[:, :, None, :, None].expand(-1, -1, c_out, -1, taps)
        weight = self.weight.expand(n, -1, -1, -1, -1).gather(3, index)
        weight.mul_(saliency.gather(2, idx)[:, :, None, :, None])
        if block.kernel_size == 1:
            out = self._pointwise(x, idx, weight)
        else:
            out = self._per_image(x, idx, weight)
        return out, decision

    def _rows(self, x, idx):
        """(N, H, positions, K): every image's and head's kept channels, position-major (channels-last map)."""
        n, c, height, width = x.shape
        return self.ops.gather_channels(x.permute(0, 2, 3, 1).reshape(n * height * width, c), idx,
                                           height * width)

    def _pointwise(self, x, idx, weight):
        stride = self.block.stride
        if stride > 1:
            x = x[..., ::stride, ::stride].contiguous(memory_format=torch.channels_last)
        n, _, height, width = x.shape
        out = torch.matmul(self._rows(x, idx), weight[..., 0].transpose(2, 3))  # (N, H, positions, C_out/H)
        # channel j * H + h is head h's j: (N, positions, C_out/H, H) is the interleaved channels-last map
        return out.permute(0, 2, 3, 1).reshape(n, height, width, -1).permute(0, 3, 1, 2)

    def _per_image(self, x, idx, weight):
        block = self.block
        n, _, height, width = x.shape
        heads, k = block.heads, block.kernel_size
        # the kept channels of every head side by side, gathered straight into a channels-last map (N, H*K, h, w)
        rows = x.permute(0, 2, 3, 1)
        inputs = rows.gather(3, idx.reshape(n, 1, 1, -1).expand(-1, height, width, -1)).permute(0, 3, 1, 2)
        weight = weight.reshape(n, -1, self.kept, k, k)  # per image (C_out head-major, K, k, k)
        out = torch.cat([F.conv2d(inputs[i:i + 1], weight[i], None, block.stride, block.padding, groups=heads)
                         for i in range(n)])
        out = out.reshape(n, heads, -1, *out.shape[-2:])  # head-major channels: interleave them
        return out.transpose(1, 2).reshape(n, -1, *out.shape[-2:]).contiguous(memory_format=torch.channels_last)
