"""The engine plan of ResNet blocks (BasicBlock, Bottleneck in dynconv/models/resnet.py), read from the structure
they declare (`conv_norm_pairs`, `act_out`, `downsample`, `masker`).

Per block, position-major (rows = pixels, columns = channels):
- the gate runs as usual; the active positions of the mask and of the dilated mask become index lists;
- BasicBlock: conv1 (3x3, strided) = gather of the 3x3 neighbourhoods of the dilated positions (im2col of the
  active positions only) + one matrix product with BatchNorm folded in + ReLU; the rows go into a zero buffer;
  conv2 (3x3) the same way at the mask positions, from that buffer;
- Bottleneck: conv1 (1x1) = matrix product on the gathered rows of the dilated positions, into the zero buffer;
  conv2 (3x3, strided) and conv3 (1x1) at the mask positions;
- a 3x3 neighbourhood is a row gather through a table of tap rows per output pixel (layout.tap_table); taps
  outside the map read a zero row appended to the map's rows (no padded copies of the maps);
- the block result is added into the identity at the mask positions only, with the ReLU fused.

Positions outside the mask keep the identity. ResNet block inputs come out of a ReLU (or of max-pooling one), so
they need no ReLU; a downsampled identity (conv + BN) gets one over the whole map.

When a block's active fraction is high, gathering costs more than it saves; above a limit (`dense_above`, lower
for blocks with little work) the block runs densely (oneDNN/cuDNN convolutions with the same folded weights) and
is masked afterwards, or, when only its dilated mask is that dense, its conv1 runs everywhere.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...multitarget import variant
from ..layout import fold_conv_bn, rows, tap_table, with_zero_row
from . import BlockPlan

SMALL_MAP_ROWS = 4096  # output pixels (batch included) below which oneDNN's strided 1x1 conv beats a matrix product
TILE_COUNT_SHARE = 16  # active tile counts are padded up to a multiple of 1/16 of the tiles: fewer conv shapes


class TileGeometry:
    """Where the tiles of a block read and write, for one input shape and tile side (cached by the plan).

    Going back from a tile x tile output tile through the block's convs (kernel k, stride s, padding p), each
    layer's input window is (size - 1) * s + k wide and starts s * start - p from the tile's origin. `windows`:
    per tile (N * grid_h * grid_w tiles, image-major, then the null tile), the rows of the block input's window
    (outside the map: the zero row after the map's rows); `valid[i]`: per tile, 1 where conv i's output window
    lies on the map (None when conv i + 1 is 1x1 and nothing outside the map can reach the tile);
    `targets`: per tile, the output rows of its tile x tile positions (outside the map: a dump row, N * H * W).
    """

    def __init__(self, folded, input_shape, tile):
        n, _, h, w = input_shape
        device = folded[0].weight.device
        sizes = [(h, w)]
        for f in folded:
            k, s, p = f.weight.shape[-1], f.stride, f.padding
            sizes.append(tuple((d + 2 * p - k) // s + 1 for d in sizes[-1]))
        self.dense_macs = sum(f.weight[0].numel() * f.weight.shape[0] * size[0] * size[1]
                              for f, size in zip(folded, sizes[1:]))  # per image
        if tile is None:
            return
        out_h, out_w = sizes[-1]
        grid_h, grid_w = -(-out_h // tile), -(-out_w // tile)
        self.overhangs = out_h % tile != 0 or out_w % tile != 0
        # windows (size, start relative to the tile origin, origin step per tile) from the output back
        size, start, step, windows = tile, 0, tile, [(tile, 0, tile)]
        for f in reversed(folded):
            k, s, p = f.weight.shape[-1], f.stride, f.padding
            size, start, step = (size - 1) * s + k, start * s - p, step * s
            windows.append((size, start, step))
        windows.reverse()  # windows[i]: the input window of conv i; windows[-1]: the output tile
        self.window = windows[0][0]
        self.tile_macs = sum(f.weight[0].numel() * f.weight.shape[0] * windows[i + 1][0] ** 2
                             for i, f in enumerate(folded))
        self.windows = self._table(n, grid_h, grid_w, windows[0], h, w, n * h * w).to(device)
        self.valid = []
        for i in range(len(folded) - 1):
            if folded[i + 1].weight.shape[-1] == 1:
                self.valid.append(None)
                continue
            on_map = (self._table(n, grid_h, grid_w, windows[i + 1], *sizes[i + 1], -1) >= 0).float()
            self.valid.append(on_map.view(-1, 1, windows[i + 1][0], windows[i + 1][0]).to(device))
        self.targets = self._table(n, grid_h, grid_w, windows[-1], out_h, out_w, n * out_h * out_w)[:-1].to(device)
        self.null_tile = n * grid_h * grid_w

    @staticmethod
    def _table(n, grid_h, grid_w, window, h, w, outside):
        """(N * grid_h * grid_w + 1, size * size): the rows of each tile's window on N maps of (h, w), image-major;
        positions outside the map are `outside`; the last row (the null tile) is all `outside`."""
        size, start, step = window
        ys = torch.arange(grid_h)[:, None] * step + start + torch.arange(size)  # (grid_h, size)
        xs = torch.arange(grid_w)[:, None] * step + start + torch.arange(size)  # (grid_w, size)
        inside = ((ys >= 0) & (ys < h))[:, None, :, None] & ((xs >= 0) & (xs < w))[None, :, None, :]
        pixel = ys[:, None, :, None] * w + xs[None, :, None, :]  # (grid_h, grid_w, size, size)
        table = torch.arange(n)[:, None, None, None, None] * (h * w) + pixel
        table = torch.where(inside, table, outside).reshape(n * grid_h * grid_w, size * size)
        return torch.cat([table, torch.full((1, size * size), outside)])


def _check_layers(block):
    """The plan folds Conv2d + BatchNorm2d pairs and fuses ReLU: other injected layers have no plan here."""
    convs, norms = zip(*block.conv_norm_pairs())
    norms = [variant(n) for n in norms]
    if not all(type(c) is nn.Conv2d for c in convs) or not all(type(n) is nn.BatchNorm2d for n in norms):
        raise ValueError(f"the engine's ResNet plan runs Conv2d + BatchNorm2d blocks; {type(block).__name__} has "
                         f"{type(convs[0]).__name__} / {type(norms[0]).__name__}")
    kernels = [c.kernel_size[0] for c in convs]
    if kernels not in ([3, 3], [1, 3, 1]):
        raise ValueError(f"the engine's ResNet plan runs 3x3-3x3 and 1x1-3x3-1x1 residual branches; "
                         f"{type(block).__name__} has kernels {kernels}")
    if not isinstance(block.act_out, nn.ReLU):
        raise ValueError(f"the engine's ResNet plan fuses a ReLU after the residual add; this block has "
                         f"{type(block.act_out).__name__}")
    if block.downsample is not None:
        conv, bn = block.downsample
        if not (type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and conv.kernel_size == (1, 1)):
            raise ValueError("unsupported downsample (the engine folds a 1x1 conv + BatchNorm)")


class ResNetBlockPlan(BlockPlan):
    """BasicBlock (conv1 3x3, conv2 3x3) and Bottleneck (conv1 1x1, conv2 3x3, conv3 1x1) with a spatial gate."""

    def __init__(self, block, ops, settings):
        super().__init__(block, ops, settings)
        _check_layers(block)
        with torch.no_grad():
            self.downsample = fold_conv_bn(*block.downsample) if block.downsample is not None else None
        self.convs, self.norms = zip(*block.conv_norm_pairs())  # the block's declared structure
        self.bottleneck = len(self.convs) == 3  # 1x1, 3x3, 1x1 (checked)
        self._folds = {}  # the norms in use (one set per target in multi-target blocks) -> folded convs
        self._default_folds = None
        self._default_folds = self.folds(None)
        self._geometries = {}
        self._whole_gates = {}  # (input shape, dtype, device, target) -> the whole-map gate's pieces, or None
        self.executed_macs = 0.0  # MACs of the block's convs in the last call, as executed (halos included)

    def folds(self, target):
        """The block's convs with the norms of `target` folded in (built once per set of norms)."""
        if target is None and self._default_folds is not None:  # the common case, without the lookup
            return self._default_folds
        norms = tuple(variant(n, target) for n in self.norms)
        if norms not in self._folds:
            with torch.no_grad():
                self._folds[norms] = [fold_conv_bn(c, bn) for c, bn in zip(self.convs, norms)]
        return self._folds[norms]

    def __call__(self, x, target=None):
        folded = self.folds(target)
        gate = self._whole_map_gate(x, target)
        if gate is not None:  # one decision per image, from one product (a fixed cost of every block)
            unit, functional, constant = gate
            n = x.shape[0]
            logit = torch.addmv(constant, x.permute(0, 2, 3, 1).reshape(n, -1), functional)
            decision = unit.whole_map_decision(logit.view(n, 1, 1, 1), x.shape)
        else:
            decision = self.block.masker.forward(x, target)  # no hook machinery: a fixed cost of every block
        identity = x if self.downsample is None else self._downsample(x)
        if decision.whole_map:
            return self._whole_blocks(x, identity, folded, decision.per_image()), decision
        if decision.tile > 1 and self.settings.tile_path:
            return self._tiles(x, identity, folded, decision), decision
        # the result goes into `identity` in place; outside the mask it is a ReLU output (non-negative, as
        # scatter_add_relu_ requires) or, downsampled, gets its ReLU below
        out = identity
        idx, idx_dilated = decision.active_positions()
        self.executed_macs = 0.0
        if idx.numel() > 0:
            limit = self._dense_limit(decision)
            if idx.numel() > limit * decision.hard.numel():
                self.executed_macs = self.geometry(x.shape).dense_macs * x.shape[0]
                return torch.addcmul(identity, self._dense_residual(x, folded), decision.hard).relu_(), decision
            if idx_dilated.numel() > limit * decision.dilated.numel():
                idx_dilated = None  # conv1 everywhere: cheaper than gathering almost every position
            self.executed_macs = float(idx.numel() * decision.cost.macs)
            if idx_dilated is None:
                self.executed_macs += decision.dilated.numel() * decision.dilated_cost.macs
            else:
                self.executed_macs += idx_dilated.numel() * decision.dilated_cost.macs
            rows_fn = self._bottleneck_rows if self.bottleneck else self._basic_rows
            residual = rows_fn(x, folded, idx, idx_dilated, decision.hard.shape[-2:])
            self.ops.scatter_add_relu_(rows(out), idx, residual)
        if self.downsample is not None:
            out.relu_()  # the downsampled identity can be negative outside the mask
        return out, decision

    def _whole_map_gate(self, x, target):
        """(unit, functional, constant) when the block's gate decides once per image for inputs shaped like x: its
        mean logit as one product (MaskLogits.mean_functional), taken once per shape and target from the weights
        the plan was built with, as the folded convs are (the engine runs frozen weights); else None."""
        masker = self.block.masker
        shape = x.shape
        key = (shape, x.dtype, x.device, target if target is not None else getattr(masker, "selected", None))
        if key not in self._whole_gates:
            unit = variant(masker, target)
            gate = None
            if hasattr(unit, "covers") and unit.covers(shape[-2:]):
                with torch.no_grad():
                    functional, constant = unit.maskconv.mean_functional(shape[-2], shape[-1], x.dtype, x.device)
                gate = unit, functional, constant
            self._whole_gates[key] = gate
        return self._whole_gates[key]

    def _whole_blocks(self, x, identity, folded, on):
        """One decision per image (`on`: (N,) 0/1): the block runs densely on the images it is on for, batched,
        and its result is added into their identity (ReLU fused); the others keep the identity."""
        if x.shape[0] == 1:  # batch 1: on or off, no index list (a fixed cost of every block)
            active, count = None, int(on.item())
        else:
            active = on.nonzero().squeeze(1)
            count = active.numel()
        self.executed_macs = self.geometry(x.shape).dense_macs * count
        if count == x.shape[0]:
            return identity.add_(self._dense_residual(x, folded)).relu_()
        out = None
        if count > 0:  # the active images' outputs, relu(identity + residual)
            residual = self._dense_residual(x.index_select(0, active), folded)
            out = residual.add_(identity.index_select(0, active)).relu_()
        if self.downsample is not None:
            identity = identity.relu_()  # the skipped images keep relu(downsample(x))
        if out is not None:  # into x itself when there is no downsample (x is not reused); the others untouched
            identity.index_copy_(0, active, out)
        return identity

    def _tiles(self, x, identity, folded, decision):
        """Tile-constant masks: each active tile with its halo gathered into a batch of small maps, the block's
        convs run densely on that batch without padding (the map border's zeros come from the gather and from
        `valid`), the tiles' results added into the identity, ReLU fused. Runs densely where the tiles and their
        halos would cost more than the whole map."""
        geometry = self.geometry(x.shape, decision.tile)
        grid = decision.hard[:, 0, ::decision.tile, ::decision.tile]
        active = grid.reshape(-1).nonzero().squeeze(1)
        count = active.numel()
        if count == 0:
            self.executed_macs = 0.0
            return identity.relu_() if self.downsample is not None else identity
        multiple = max(1, geometry.null_tile // TILE_COUNT_SHARE)  # repeating shapes: oneDNN's cached kernels
        padded = -(-count // multiple) * multiple
        if padded * geometry.tile_macs > self.settings.dense_above * x.shape[0] * geometry.dense_macs:
            self.executed_macs = geometry.dense_macs * x.shape[0]
            return torch.addcmul(identity, self._dense_residual(x, folded), decision.hard).relu_()
        self.executed_macs = padded * geometry.tile_macs
        tiles = F.pad(active, (0, padded - count), value=geometry.null_tile)  # null tiles: zeros, not scattered
        windows = geometry.windows.index_select(0, tiles).reshape(-1)
        y = self.ops.gather_rows(with_zero_row(rows(x)), windows)
        y = y.view(padded, geometry.window, geometry.window, -1).permute(0, 3, 1, 2)
        for i, f in enumerate(folded):
            y = f.conv(y, relu=i < len(folded) - 1, padding=0)
            if i < len(folded) - 1:
                if geometry.valid[i] is not None:  # positions outside the map: zeros, as the padding would be
                    y = y.mul_(geometry.valid[i].index_select(0, tiles))
        residual = y[:count].permute(0, 2, 3, 1).reshape(count * decision.tile ** 2, -1)
        targets = geometry.targets.index_select(0, active).reshape(-1)
        if geometry.overhangs:  # tiles over the border: their outside rows go to a dump row, cut off after
            out = with_zero_row(rows(identity))
            out.index_add_(0, targets, residual).relu_()
            n, c, h, w = identity.shape
            return out[:-1].view(n, h, w, c).permute(0, 3, 1, 2)
        self.ops.scatter_add_relu_(rows(identity), targets, residual)
        return identity.relu_() if self.downsample is not None else identity

    def geometry(self, input_shape, tile=None):
        """The block's TileGeometry for inputs of `input_shape` and tiles of side `tile` (None: no tile tables;
        just the dense MACs per image), built once per shape."""
        key = (tuple(input_shape), tile)
        if key not in self._geometries:
            self._geometries[key] = TileGeometry(self.folds(None), tuple(input_shape), tile)
        return self._geometries[key]

    def _dense_limit(self, decision):
        """Active fraction above which the block (or its conv1) runs densely: dense_above, lowered by the gathered
        path's fixed cost relative to the block's dense work (below zero: always dense, as for small maps);
        -1 (always dense) for blocks narrower than min_gather_width."""
        s = self.settings
        if self.convs[1].out_channels < s.min_gather_width:  # the 3x3 conv
            return -1.0
        dense_macs = decision.hard.numel() * decision.cost.macs + decision.dilated.numel() * decision.dilated_cost.macs
        return s.dense_above - s.gather_overhead_macs / dense_macs

    def _downsample(self, x):
        """1x1 strided conv + BN as one matrix product on the subsampled pixels (oneDNN's strided 1x1 conv
        is several times slower per MAC), except for one image with the conv's weight prepacked for its shape:
        that conv ran 10-20% faster than the product on ResNet-50's strided downsamples (on a 2-core AVX2 CPU,
        e.g. 1.34 against 1.51 ms for 512 -> 1024 channels on 28 x 28 maps)."""
        folded = self.downsample
        s = folded.stride
        if s > 1 and folded.packed_weight(x, folded.padding) is not None:
            return folded.conv(x)
        n, _, h, w = x.shape
        small = n * h * w <= SMALL_MAP_ROWS * s * s
        if small and not folded.linear.runs_onednn(n * -(-h // s) * -(-w // s)):  # the conv beats addmm there
            return folded.conv(x)
        x = x[:, :, ::s, ::s].contiguous(memory_format=torch.channels_last)
        n, _, h, w = x.shape
        out = self.ops.linear(rows(x), folded.linear, False)
        return out.reshape(n, h, w, -1).permute(0, 3, 1, 2)

    def _dense_residual(self, x, folded):
        """The residual branch over the whole map, with the folded weights (oneDNN / cuDNN convolutions)."""
        for i, f in enumerate(folded):
            x = f.conv(x, relu=i < len(folded) - 1)
        return x

    def _gathered_conv3x3(self, src, idx, n, out_hw, stride, in_hw, folded, relu):
        """A 3x3 conv (padding 1, BN folded) at the output positions `idx`; src: the input's rows + a zero row."""
        taps = tap_table(n, *out_hw, stride, *in_hw, 3, 1, idx.device).index_select(0, idx)
        return self.ops.linear(self.ops.gather_patches(src, taps), folded.linear, relu)

    def _buffer(self, map_rows, idx, num_rows):
        """A map of `num_rows` rows + the zero row, holding `map_rows` at the positions `idx`, for the next 3x3 conv
        at the mask positions. Its other rows are left unset, not zeroed (1 ms of a ResNet-50 forward): that conv
        reads only positions of the dilated mask, which `idx` lists, and the zero row (taps outside the map)."""
        buffer = map_rows.new_empty(num_rows + 1, map_rows.shape[1])
        buffer[num_rows].zero_()
        return self.ops.scatter_rows_(buffer, idx, map_rows)

    def _basic_rows(self, x, folded, idx, idx_dilated, out_hw):
        """conv1 at the dilated positions (or everywhere when idx_dilated is None), conv2 at the mask."""
        n, _, h, w = x.shape
        conv1, conv2 = folded
        if idx_dilated is None:
            y1 = conv1.conv(x, relu=True)
            buffer = with_zero_row(rows(y1))
        else:
            y1 = self._gathered_conv3x3(with_zero_row(rows(x)), idx_dilated, n, out_hw, conv1.stride, (h, w),
                                        conv1, relu=True)
            buffer = self._buffer(y1, idx_dilated, n * out_hw[0] * out_hw[1])
        return self._gathered_conv3x3(buffer, idx, n, out_hw, 1, out_hw, conv2, relu=False)

    def _bottleneck_rows(self, x, folded, idx, idx_dilated, out_hw):
        """conv1 at the dilated positions (or everywhere when idx_dilated is None), conv2 and conv3 at the mask."""
        n, _, h, w = x.shape
        conv1, conv2, conv3 = folded
        if idx_dilated is None:
            buffer = with_zero_row(self.ops.linear(rows(x), conv1.linear, True))
        else:
            y1 = self.ops.linear(self.ops.gather_rows(rows(x), idx_dilated), conv1.linear, True)
            buffer = self._buffer(y1, idx_dilated, n * h * w)
        y2 = self._gathered_conv3x3(buffer, idx, n, out_hw, conv2.stride, (h, w), conv2, relu=True)
        return self.ops.linear(y2, conv3.linear, False)
