"""Engine plan of a dynamic group convolution (models/dgc.py's DGCConv): each head convolves only the input
channels it kept for the image, with the matching slice of its weights, instead of every channel times a saliency
of zero.

Per image n and head h with kept channels idx[n, h] (the K = C_in - inactive largest saliencies; K is fixed by the
trained `inactive`): the gathered weights W_h[:, idx] are scaled by the saliencies once (C_out/H x K numbers, not
the K x H x W input), then
- 1x1 convs: one batched matrix product over images and heads, (C_out/H, K) @ (K, positions);
- k x k convs: one grouped conv over the gathered inputs with N * H groups (each image and head its own weights).
BN + ReLU of the input run as in the layer (eval mode), and the saliency generator is the layer's own. Where ties
make the layer zero more than `inactive` channels, the extra gathered ones have saliency 0 here too: the same
function. The output is interleaved as the layer's (channel j * H + h is head h's j).
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
        x = block.relu(block.norm(x))
        saliency, kept, raw = block.gate(x.mean((2, 3)), target)
        decision = block.decision(kept, raw, x)
        idx = saliency.topk(self.kept, dim=-1, sorted=False).indices  # (N, H, K)
        n, heads = x.shape[0], block.heads
        images = torch.arange(n, device=x.device)[:, None, None]
        heads_index = torch.arange(heads, device=x.device)[None, :, None]
        # (N, H, C_out/H, K, k*k): each image's and head's weights at its kept channels, times their saliencies
        weight = self.weight[heads_index, :, idx].transpose(2, 3) * saliency.gather(2, idx)[:, :, None, :, None]
        inputs = x[images, idx]  # (N, H, K, height, width)
        if block.kernel_size == 1:
            out = self._pointwise(inputs, weight)
        else:
            out = self._grouped(inputs, weight)
        c_out = block.out_channels
        # (N, H, C_out/H, ...) -> interleaved channels, as the layer's channel shuffle
        return out.transpose(1, 2).reshape(n, c_out, *out.shape[-2:]).contiguous(
            memory_format=torch.channels_last), decision

    def _pointwise(self, inputs, weight):
        stride = self.block.stride
        if stride > 1:
            inputs = inputs[..., ::stride, ::stride]
        n, heads, kept, height, width = inputs.shape
        out = torch.matmul(weight[..., 0], inputs.reshape(n, heads, kept, height * width))
        return out.reshape(n, heads, -1, height, width)

    def _grouped(self, inputs, weight):
        block = self.block
        n, heads, kept, height, width = inputs.shape
        k = block.kernel_size
        out = F.conv2d(inputs.reshape(1, n * heads * kept, height, width),
                       weight.reshape(n * heads * weight.shape[2], kept, k, k), None, block.stride, block.padding,
                       groups=n * heads)
        return out.reshape(n, heads, -1, *out.shape[-2:])
