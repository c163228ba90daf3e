"""Mask units: decide per image at which spatial positions a residual block computes.

A mask unit looks at the block input and produces a hard (0/1) mask at the block's output resolution,
plus the *dilated* mask: the positions where the block's first conv must run so that the following
3x3 conv has all its inputs.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import fused
from .decisions import ZERO, SpatialDecision, UnitCost
from .gates import Gate
from .sparse.linear import onednn_applies, onednn_pays


def sample_gumbel_difference(like, eps=1e-8):
    """g1 - g2 for independent Gumbel(0, 1) samples g = -log(-log(U)), shaped (and strided) like `like`.

    The difference of two independent Gumbel(0, 1) variables is Logistic(0, 1), whose inverse CDF is
    logit(u) = log(u / (1 - u)): one uniform draw and one op instead of two draws and four logs (3.5x faster
    on the largest CIFAR mask maps). U is clamped to [eps, 1 - eps], as the reference's eps keeps the logs finite.
    """
    return torch.logit(torch.rand_like(like), eps=eps)


def dilate_mask(hard, dilate_stride=1, output_size=None):
    """Positions the block's first conv must compute so that a 3x3 conv can run at every `hard` position.

    With dilate_stride d > 1 (a strided 3x3 conv after the first conv), each mask element is first placed
    at the top-left corner of a d x d cell, then the result is dilated with a 3x3 window. `output_size`
    crops to the first conv's resolution (odd input sizes give one extra row/column otherwise).
    """
    if dilate_stride > 1:
        n, c, h, w = hard.shape
        up = hard.new_zeros(n, c, h * dilate_stride, w * dilate_stride)
        up[:, :, ::dilate_stride, ::dilate_stride] = hard
        hard = up
    if hard.numel() <= 4096:  # small maps: one op beats five
        dilated = F.max_pool2d(hard, kernel_size=3, stride=1, padding=1)
    else:  # 3x3 max separably on shifted views: 20x faster than max_pool2d (which computes indices) at batch 128
        padded = F.pad(hard, (1, 1, 1, 1))
        rows = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
        dilated = torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])
    if output_size is not None:
        dilated = dilated[:, :, : output_size[0], : output_size[1]]
    return dilated


def expand_tiles(grid, tile, size):
    """A per-tile map (N, C, ceil(H / tile), ceil(W / tile)) as the per-position map of size (H, W): each tile's
    value repeated over its tile x tile positions, the tiles overhanging the border cropped. Differentiable (a
    tile's gradient is the sum over its positions on the map)."""
    full = grid.repeat_interleave(tile, dim=2).repeat_interleave(tile, dim=3)
    return full[:, :, : size[0], : size[1]]


class MaskLogits(nn.Module):
    """Spatial logits: a 3x3 conv to one channel plus a per-image term from the global average (C -> 1)."""

    def __init__(self, channels, stride):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size=3, stride=stride, padding=1, bias=True)
        self.fc = nn.Linear(channels, 1)
        self._tap_cache = None
        self._mean_cache = None
        self._tile_cache = None
        self._sizes = {}

    def forward(self, x):
        stride = self.conv.stride[0]
        if not torch.is_grad_enabled():
            return tap_logits(x, *self.tap_matrix(), stride)
        if stride == 1:
            return TapLogits.apply(x, self.conv.weight, self.conv.bias, self.fc.weight, self.fc.bias)
        # strided training: the tap product would cover stride^2 times the output pixels; oneDNN's conv wins.
        # Sum, then scale the small result: mean()'s backward divides a full-size tensor.
        global_term = self.fc(x.sum(dim=(2, 3)) / (x.shape[2] * x.shape[3]))[:, :, None, None]
        return self.conv(x) + global_term

    def tile_logits(self, x, tile):
        """forward(x) averaged over tile x tile tiles of its output, (N, 1, ceil(H' / tile), ceil(W' / tile)):
        F.avg_pool2d with ceil_mode (a tile over the right or bottom border averages the positions it has on the
        map), the spec. Without gradients on CPUs (float32, channels-last) one fused pass over x instead, which
        never forms the per-position map (fused.tile_logits): at batch 1 on a 2-core AVX2 CPU 3.3-3.7x faster
        for ResNet-50's 8 x 8 tiles on 56 x 56 maps (188 against 631 us), 3.1-3.5x / 2.1-2.5x for 4 x 4 / 2 x 2
        tiles on its 28 x 28 / 14 x 14 maps, 3.9-4.0x for the strided unit of its stage 2."""
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and fused.usable(x):
            stride, out_size = self._geometry(x.shape[-2:])
            return fused.tile_logits(x, *self.tile_weights(), stride, tile, out_size)
        return self(x) if tile == 1 else F.avg_pool2d(self(x), tile, tile, ceil_mode=True)

    def _geometry(self, input_size):
        """(stride, output size) for inputs of `input_size`, kept per size (a fixed cost of every block)."""
        if input_size not in self._sizes:
            stride = self.conv.stride[0]
            self._sizes[input_size] = stride, tuple((s - 1) // stride + 1 for s in input_size)
        return self._sizes[input_size]

    def _parameters_and_key(self):
        """(conv.weight, conv.bias, fc.weight, fc.bias) and their storages and in-place versions: the key under
        which the caches below stay valid. Read from the modules' dicts: a module attribute costs a microsecond,
        and this runs in every block and image batch."""
        conv, fc = self._modules["conv"]._parameters, self._modules["fc"]._parameters
        params = (conv["weight"], conv["bias"], fc["weight"], fc["bias"])
        return params, tuple((p.data_ptr(), p._version) for p in params)

    def tile_weights(self):
        """(class_weights (64, C), fc (C,), constant) of fused.tile_logits, kept while the parameters are
        unchanged (as tap_matrix). Row 8 * a + b sums the conv's taps (dy, dx) with bit dy of a and bit dx of b
        set: the weight of an input pixel that tap rows a and tap columns b connect to a tile."""
        params, key = self._parameters_and_key()
        if self._tile_cache is None or self._tile_cache[0] != key:
            with torch.no_grad():
                bits = torch.tensor([[(m >> d) & 1 for d in range(3)] for m in range(8)], dtype=torch.float64)
                weight = self.conv.weight[0].double()  # (C, 3, 3)
                classes = torch.einsum("ya,xb,cab->yxc", bits, bits, weight).reshape(64, -1)
                constant = float(self.conv.bias.double().sum() + self.fc.bias.double().sum())
                self._tile_cache = (key, (classes.float().contiguous(), self.fc.weight[0].float().contiguous(),
                                          constant))
        return self._tile_cache[1]

    def mean_logit(self, x):
        """The mean over output positions of forward(x), per image: (N, 1, 1, 1), with no gradient. The mean of
        a linear map is a linear functional of x, so it is one dot product per image with a (H, W, C) map built
        once per input size (`mean_functional`): the decision of a tile covering the whole map, at the cost of
        a pass over x where the logits map takes a product, a window sum and a pool."""
        n, c, h, w = x.shape
        functional, constant = self.mean_functional(h, w, x.dtype, x.device)
        flat = x.permute(0, 2, 3, 1).reshape(n, h * w * c)  # a view when x is channels-last
        return torch.addmv(constant, flat, functional).view(n, 1, 1, 1)

    def mean_functional(self, h, w, dtype, device):
        """(H * W * C,) weights and the constant of `mean_logit` for (h, w) inputs; cached with the parameters'
        storage and versions, like tap_matrix."""
        params, version = self._parameters_and_key()
        if self._mean_cache is None or self._mean_cache[0] != version:
            self._mean_cache = (version, {})
        functionals = self._mean_cache[1]
        key = (h, w, dtype, device)
        if key not in functionals:
            with torch.no_grad():
                functionals[key] = mean_functional(*params, h, w, self.conv.stride[0], dtype, device)
        return functionals[key]

    def tap_matrix(self):
        """The (10, C) projection of `tap_logits` and its constant term; see `tap_matrix`. Kept while the
        parameters are unchanged (same storage, same in-place version): inference builds it once."""
        params, key = self._parameters_and_key()
        if self._tap_cache is None or self._tap_cache[0] != key:
            with torch.no_grad():
                self._tap_cache = (key, tap_matrix(*params))
        return self._tap_cache[1]


def tap_matrix(conv_weight, conv_bias, fc_weight, fc_bias):
    """MaskLogits' parameters as the (10, C) projection of `tap_logits` and its constant term (conv bias + fc
    bias). Rows 0-8: the conv's taps in reverse order (row 8 - (3 * dy + dx) holds tap (dy, dx), the order
    F.fold sums); row 9: the fc."""
    c = conv_weight.shape[1]
    taps = conv_weight.permute(0, 2, 3, 1).reshape(9, c).flip(0)
    return torch.cat([taps, fc_weight]), conv_bias + fc_bias


def mean_functional(conv_weight, conv_bias, fc_weight, fc_bias, h, w, stride, dtype, device):
    """MaskLogits' mean logit over its output positions as a linear functional of a (h, w) input: the conv's
    output at p sums tap (dy, dx) of input pixel stride * p + (dy - 1, dx - 1), so the mean over the P output
    pixels weighs input pixel (y, x) by (1 / P) * sum over the taps that read it of the tap's weights; the fc on
    the global average adds fc / (h * w) everywhere. -> ((h * w * C,) weights in (y, x, c) order, constant)."""
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1

    def reads(size, out_size):  # (3, size): 1 where tap offset d - 1 reads this input coordinate for some output
        hits = torch.zeros(3, size, dtype=torch.float64)
        for d in range(3):
            coords = torch.arange(out_size) * stride + d - 1
            hits[d, coords[(coords >= 0) & (coords < size)]] = 1.0
        return hits

    weight = conv_weight[0].double()  # (C, 3, 3)
    per_pixel = torch.einsum("cab,ay,bx->yxc", weight, reads(h, out_h), reads(w, out_w)) / (out_h * out_w)
    per_pixel = per_pixel + fc_weight[0].double() / (h * w)
    constant = (conv_bias + fc_bias).double()
    return per_pixel.reshape(-1).to(dtype=dtype, device=device), constant.to(dtype=dtype, device=device)


def tap_logits(x, matrix, constant, stride):
    """MaskLogits (a 3x3 conv C -> 1 with stride and padding 1, plus a linear layer on the global average pool)
    as one matrix product and a window sum, from `tap_matrix`'s projection. oneDNN runs a 1-output-channel
    conv, forward and backward, several times slower than its MACs suggest.

    taps = matrix @ x gives, at every input pixel q, the contributions x[q] . w[dy, dx] of q to the 3x3 windows
    around it (rows 0-8) and the fc's projection (row 9). The logit of output pixel p adds, for each tap, the
    contribution of input pixel stride * p + (dy - 1, dx - 1), plus the image's average of row 9 and the constant.
    No autograd; training uses `TapLogits`, which runs this and has its own backward.
    """
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view when x is channels-last
    taps = _tap_product(matrix.to(x.dtype), rows).view(10, n, h, w)  # tap-major: each tap a map
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    # the image averages of row 9 plus the constant, as one op (mean and add are two, each ~15 us at batch 1)
    global_term = torch.addmv(constant.to(x.dtype), taps[9].reshape(n, -1), _averaging_vector(h * w, x.dtype,
                                                                                                x.device))
    global_term = global_term[:, None, None]
    if n * h * w <= 4096:  # small maps: F.fold (col2im) is one op where the shifted adds are nine
        out = F.fold(taps[:9].reshape(9, n, h * w).transpose(0, 1), (h, w), kernel_size=3, padding=1)
        out = out[:, 0, ::stride, ::stride] + global_term
    else:  # large maps: nine shifted adds of contiguous maps beat col2im several times
        out = taps[4, :, ::stride, ::stride] + global_term  # the centre tap covers every output pixel
        for dy in range(3):
            for dx in range(3):
                if (dy, dx) != (1, 1):
                    oy, iy = _tap_slices(h, out_h, dy - 1, stride)
                    ox, ix = _tap_slices(w, out_w, dx - 1, stride)
                    out[:, oy, ox] += taps[8 - 3 * dy - dx, :, iy, ix]
    return out[:, None]


def _tap_product(matrix, rows):
    """matrix @ rows.t(), (10, pixels); on CPUs through oneDNN's linear (a transposed view of its (pixels, 10)
    result), which ran 1.1-2.5x faster than torch.mm's BLAS on ResNet-50's maps on the development CPU; small
    products (CIFAR maps) through torch.mm, whose call costs less."""
    if onednn_applies(rows) and not rows.requires_grad and onednn_pays(rows.shape[0], matrix):
        return torch.ops.mkldnn._linear_pointwise(rows, matrix, None, "none", [], "").t()
    return matrix @ rows.t()


@functools.lru_cache(maxsize=64)
def _averaging_vector(length, dtype, device):
    return torch.full((length,), 1.0 / length, dtype=dtype, device=device)


def _tap_slices(size, out_size, offset, stride):
    """Along one axis, for a tap at `offset` (-1, 0, 1): the output slice and the input slice it reads
    (output y reads input stride * y + offset, where that is inside the map)."""
    lo = 1 if offset < 0 else 0
    hi = min(out_size, (size - 1 - offset) // stride + 1)
    start = stride * lo + offset
    return slice(lo, hi), slice(start, start + stride * (hi - lo - 1) + 1, stride)


class TapLogits(torch.autograd.Function):
    """`tap_logits` at stride 1 from MaskLogits' own parameters, with its backward: one autograd node where the
    rearrangement into the tap matrix would add five (with their backward nodes) per block.

    Backward: the tap gradients are shifted views of the zero-padded logit gradient; x's gradient and the
    matrix's are one product each; the parameters' gradients are views of the matrix's.
    """

    @staticmethod
    def forward(ctx, x, conv_weight, conv_bias, fc_weight, fc_bias):
        matrix, constant = tap_matrix(conv_weight, conv_bias, fc_weight, fc_bias)
        ctx.save_for_backward(x, matrix)
        return tap_logits(x, matrix, constant, stride=1)

    @staticmethod
    def backward(ctx, grad):
        x, matrix = ctx.saved_tensors
        n, c, h, w = x.shape
        grad = grad[:, 0]
        # tap r = 3 * ry + rx of input pixel q received grad[q - (1 - ry, 1 - rx)]: with the gradient placed at
        # offset (1, 1) in a zero (h + 2, w + 2) map, that is the map's entry q + (ry, rx)
        spread = F.pad(grad, (1, 1, 1, 1))
        grad_taps = grad.new_empty(10, n, h, w)  # tap-major: ten contiguous copies
        for r in range(9):
            grad_taps[r] = spread[:, r // 3:r // 3 + h, r % 3:r % 3 + w]
        grad_taps[9] = (grad.sum(dim=(1, 2)) / (h * w))[:, None, None]
        grad_taps = grad_taps.view(10, -1)
        grad_x = None
        if ctx.needs_input_grad[0]:  # as (N*H*W, C) rows: x's gradient comes out channels-last
            grad_x = (grad_taps.t() @ matrix.to(grad.dtype)).view(n, h, w, c).permute(0, 3, 1, 2)
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        grad_matrix = (grad_taps @ rows.to(grad.dtype)).to(matrix.dtype)
        grad_conv_weight = grad_matrix[:9].flip(0).view(1, 3, 3, c).permute(0, 3, 1, 2)
        grad_bias = grad.sum().reshape(1).to(matrix.dtype)
        return grad_x, grad_conv_weight, grad_bias, grad_matrix[9:], grad_bias.clone()


class GumbelStraightThrough(torch.autograd.Function):
    """(hard, soft) from logits: soft = sigmoid((logits + noise) / temperature) with noise = g1 - g2 when
    `noise` (see sample_gumbel_difference), hard = (soft >= 0.5) as 0/1 values with soft's gradient
    (straight-through). One autograd node where the ops would make five, on every block."""

    @staticmethod
    def forward(ctx, logits, noise, temperature):
        z = logits + sample_gumbel_difference(logits) if noise else logits.clone()
        if temperature != 1.0:
            z.div_(temperature)
        soft = z.sigmoid_()
        hard = (soft >= 0.5).to(soft.dtype)
        ctx.save_for_backward(soft)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)
        return hard, soft

    @staticmethod
    def backward(ctx, grad_hard, grad_soft):
        (soft,) = ctx.saved_tensors
        grad = grad_hard if grad_soft is None else grad_soft if grad_hard is None else grad_hard + grad_soft
        if grad is None:
            return None, None, None
        grad = torch.ops.aten.sigmoid_backward(grad, soft)  # grad * soft * (1 - soft)
        return (grad / ctx.temperature if ctx.temperature != 1.0 else grad), None, None


@functools.lru_cache(maxsize=None)
def _ones(dtype, device):
    return torch.ones((), dtype=dtype, device=device)


def _one(like):
    """A scalar 1 of `like`'s dtype and device, made once."""
    return _ones(like.dtype, like.device)


class MaskUnit(Gate):
    """Gumbel-softmax mask unit (DynConv, Verelst & Tuytelaars 2020): a spatial gate.

    Training: logits (+ Gumbel noise g1 - g2 when `gumbel_noise`; see sample_gumbel_difference), soft =
    sigmoid(logits / temperature), hard = (soft >= 0.5) with the gradient of soft (straight-through).
    Evaluation: hard = (logits >= 0).
    `cost` / `dilated_cost`: what the block's layers cost per position of the mask and of the dilated mask (no
    dilated mask when dilated_cost is None). Noise and temperature follow the training schedule (`set_schedule`).

    `tile`: the side, in pixels at the mask's (block output) resolution, of the square tiles the unit decides
    for, anchored at (0, 0) (1: one decision per position, DynConv). A tile's logit is the mean of its positions'
    logits (average pooling with ceil_mode, so a tile overhanging the right or bottom border is decided from the
    positions it has on the map): the mean keeps the per-position logits' scale, so a unit decides the same at
    tile 1 as without tiles and one trained per position can be tiled; noise and the straight-through threshold
    then act once per tile. The mask is the tile decisions expanded to positions and cropped to the map, so the
    block, the sparsity objective and the MAC count read it as any mask; a tile >= the map side is one decision
    per block and image.
    """

    def __init__(self, channels, stride=1, dilate_stride=1, cost=ZERO, dilated_cost=None, tile=1):
        super().__init__()
        if int(tile) != tile or tile < 1:
            raise ValueError(f"a mask unit's tile side must be a positive integer (got {tile})")
        self.tile = int(tile)
        self.maskconv = MaskLogits(channels, stride)
        self.dilate_stride = dilate_stride
        self.cost, self.dilated_cost = cost, dilated_cost
        self.gumbel_noise = True
        self.temperature = 1.0
        self._shapes, self._covers, self._constant_masks, self._mask_geometries = {}, {}, {}, {}

    def set_schedule(self, noise=None, temperature=None, **_):
        if noise is not None:
            self.gumbel_noise = noise
        if temperature is not None:
            self.temperature = temperature

    def uncounted_modules(self, full=False):
        return (self.maskconv.conv, self.maskconv.fc)  # counted as the decision's overhead

    def forward(self, x, target=None):
        """The SpatialDecision for x; a dilated mask at x's resolution when dilate_stride > 1."""
        if not self.training:
            if self.covers(x.shape[-2:]):
                return self.whole_map_decision(self.maskconv.mean_logit(x), x.shape)
            if self.tile > 1 or x.shape[0] == 1:  # the tiles' logits without the per-position map; at batch 1
                # also per position (tile 1), where its one op beats the tap product and window sum (1.1-2.5x on
                # ResNet and CIFAR maps; at batch 64 the taps won on CIFAR's 16-channel maps, 0.33x)
                return self.decide(self.maskconv.tile_logits(x, self.tile), x.shape[-2:], pooled=True)
        return self.decide(self.maskconv(x), x.shape[-2:])

    def output_size(self, input_size):
        stride = self.maskconv.conv.stride[0]
        return tuple((s - 1) // stride + 1 for s in input_size)

    def covers(self, input_size):
        """Whether one tile covers the whole mask: one decision per block and image."""
        covered = self._covers.get(input_size)
        if covered is None:  # per input size (a fixed cost of every block at batch 1, hence cached)
            covered = self._covers[input_size] = self.tile >= max(self.output_size(input_size))
        return covered

    def whole_map_decision(self, logit, input_shape):
        """Evaluation with one tile per map: the mean logit (N, 1, 1, 1) decides (>= 0, as the tile's average
        logit would), the masks are that value broadcast over the map (expanded views, no copies)."""
        if input_shape not in self._shapes:  # per input shape: the masks' shapes and the overhead
            n, _, *input_size = input_shape
            hard_shape = (n, 1, *self.output_size(input_size))
            dilated_shape = (n, 1, *(input_size if self.dilate_stride > 1 else hard_shape[2:]))
            self._shapes[input_shape] = hard_shape, dilated_shape, self.overhead(hard_shape)
        hard_shape, dilated_shape, overhead = self._shapes[input_shape]
        if logit.shape[0] == 1 and logit.device.type == "cpu":  # one image: the masks are one of two constants
            key = (input_shape, logit.dtype, logit.item() >= 0)
            if key not in self._constant_masks:
                self._constant_masks[key] = self._broadcast(torch.full((1, 1, 1, 1), float(key[2]),
                                                                       dtype=logit.dtype), hard_shape, dilated_shape)
            hard, dilated = self._constant_masks[key]
        else:
            on = torch.heaviside(logit, _one(logit))  # logit >= 0 as 0/1 in one op (1 at exactly 0)
            hard, dilated = self._broadcast(on, hard_shape, dilated_shape)
        return SpatialDecision(hard, dilated, None, self.cost, self.dilated_cost or ZERO, overhead, self.tile)

    def _broadcast(self, on, hard_shape, dilated_shape):
        """The masks of per-image values `on` (N, 1, 1, 1): expanded views (read-only: no copies, no writes)."""
        hard = on.expand(hard_shape)
        dilated = None
        if self.dilated_cost is not None:  # a constant mask dilates to itself, at either resolution
            dilated = hard if dilated_shape == hard_shape else on.expand(dilated_shape)
        return hard, dilated

    def decide(self, logits, input_size, pooled=False):
        """The SpatialDecision from the logits; `input_size` is the block input's (H, W). `pooled`: the logits
        are already the tiles' (MaskLogits.tile_logits), else per position."""
        tile = self.tile
        # tile 1 takes the per-position path unchanged (bit for bit what the units did before tiles)
        decided = logits if tile == 1 or pooled else F.avg_pool2d(logits, tile, tile, ceil_mode=True)
        if not self.training and fused.rows_usable(decided):  # evaluation on CPUs: masks and index lists in one op
            size, dilate_stride, dilated_size, overhead = self._mask_geometry(input_size, decided.shape)
            hard, dilated, positions = fused.tile_masks(decided, tile, size, dilate_stride, dilated_size)
            return SpatialDecision(hard, dilated, None, self.cost, self.dilated_cost or ZERO, overhead, tile,
                                   positions)
        if self.training:
            hard, soft = GumbelStraightThrough.apply(decided, self.gumbel_noise, self.temperature)
        else:
            soft = None
            hard = (decided >= 0).to(logits.dtype)
        if tile > 1:
            size = self.output_size(input_size)
            hard = expand_tiles(hard, tile, size)
            soft = None if soft is None else expand_tiles(soft, tile, size)
        dilated = None
        if self.dilated_cost is not None:
            with torch.no_grad():
                dilated = self.dilate(hard, input_size)
        return SpatialDecision(hard, dilated, soft, self.cost, self.dilated_cost or ZERO, self.overhead(hard.shape),
                               tile)

    def _mask_geometry(self, input_size, grid_shape):
        """fused.tile_masks' sizes and the unit's overhead for a block input of `input_size` and tile logits of
        `grid_shape`, kept per shape (a fixed cost of every block at batch 1)."""
        key = (input_size, grid_shape)
        if key not in self._mask_geometries:
            size = self.output_size(input_size)
            dilate_stride = self.dilate_stride if self.dilated_cost is not None else 0
            dilated_size = tuple(input_size) if self.dilate_stride > 1 else size
            self._mask_geometries[key] = size, dilate_stride, dilated_size, self.overhead((grid_shape[0], 1, *size))
        return self._mask_geometries[key]

    def extra_repr(self):
        return f"tile={self.tile}" if self.tile != 1 else ""

    def overhead(self, logits_shape):
        """The unit's own MACs for a batch: the 3x3 conv at every output position (9 C + 1 each), plus in the
        full count the linear layer on the pooled input (C + 1 per image)."""
        n, _, h, w = logits_shape
        c = self.maskconv.conv.in_channels
        conv = n * h * w * (9 * c + 1)
        return UnitCost(conv, conv + n * (c + 1))

    def dilate(self, hard, input_size):
        """The dilated mask of a hard (0/1) mask; at the block input's resolution when dilate_stride > 1."""
        return dilate_mask(hard, self.dilate_stride, input_size if self.dilate_stride > 1 else None)
