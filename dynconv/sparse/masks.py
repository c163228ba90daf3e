"""Synthetic masks at a chosen density, for benchmarks and tests: spatially clustered blobs (like trained
masks) or i.i.d. random pixels (the worst case: dilation then covers almost everything)."""
import torch
import torch.nn.functional as F

from ..decisions import ZERO, SpatialDecision
from ..maskunit import MaskUnit, expand_tiles

KINDS = ("clustered", "random")


def synthetic_mask(n, h, w, density, kind="clustered", seed=0):
    """(n, 1, h, w) 0/1 float mask with exactly round(density * h * w) active positions per image."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "clustered":
        # smooth noise: a coarse random field upsampled; its top values form blobs
        coarse = torch.rand(n, 1, max(1, h // 4), max(1, w // 4), generator=generator)
        score = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        score = score + 1e-4 * torch.rand(n, 1, h, w, generator=generator)  # break ties deterministically
    elif kind == "random":
        score = torch.rand(n, 1, h, w, generator=generator)
    else:
        raise ValueError(f"unknown mask kind '{kind}' (choices: {', '.join(KINDS)})")
    count = round(density * h * w)
    mask = torch.zeros(n, h * w)
    if count > 0:
        mask.scatter_(1, score.reshape(n, -1).topk(count, dim=1).indices, 1.0)
    return mask.reshape(n, 1, h, w)


class SyntheticMaskUnit(MaskUnit):
    """A mask unit whose logits are computed as usual (so their cost is real) but which decides a synthetic mask,
    per tile of the unit's tile side (the density is that of the tile grid). In evaluation the mask goes through
    the real unit's decision (threshold, tile expansion, dilation) from logits of +-1 that give it, so that cost
    is real too; a unit deciding once per map, and training, take the masks as they were made."""

    def __init__(self, unit, density, kind, seed):
        super().__init__(unit.maskconv.conv.in_channels, unit.maskconv.conv.stride[0], unit.dilate_stride,
                         unit.cost, unit.dilated_cost, unit.tile)
        self.maskconv = unit.maskconv
        self.density, self.kind, self.seed = density, kind, seed
        self._cache = {}
        self.train(unit.training)

    def whole_map_decision(self, logit, input_shape):  # the engine's whole-map gate: the synthetic mask too
        return self.decide(logit, input_shape[-2:])

    def decide(self, logits, input_size, pooled=False):  # the logits are the real unit's (their cost is real)
        out_h, out_w = self.output_size(input_size)
        key = (logits.shape[0], out_h, out_w, logits.device)
        if key not in self._cache:
            grid = synthetic_mask(logits.shape[0], -(-out_h // self.tile), -(-out_w // self.tile), self.density,
                                  self.kind, self.seed).to(logits.device)
            hard = expand_tiles(grid, self.tile, (out_h, out_w))
            dilated = self.dilate(hard, input_size) if self.dilated_cost is not None else None
            self._cache[key] = 2 * grid - 1, hard, dilated
        grid_logits, hard, dilated = self._cache[key]
        if not self.training and not self.covers(input_size):
            return super().decide(grid_logits, input_size, pooled=self.tile > 1)
        return SpatialDecision(hard, dilated, None, self.cost, self.dilated_cost or ZERO,
                               self.overhead(hard.shape), self.tile)


def install_synthetic_masks(model, density, kind="clustered", seed=0):
    """Replaces every mask unit of the model by a SyntheticMaskUnit (same weights and tile side); returns it."""
    parents = [(m, name, child) for m in model.modules() for name, child in m.named_children()
               if isinstance(child, MaskUnit)]
    for i, (parent, name, unit) in enumerate(parents):
        setattr(parent, name, SyntheticMaskUnit(unit, density, kind, seed + i))
    return model
