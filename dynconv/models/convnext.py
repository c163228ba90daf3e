"""ConvNeXt (Liu et al. 2022) with optional spatial gates in its blocks (the budget-aware paper's sparse ConvNeXt).

Facts from the official facebookresearch/ConvNeXt `models/convnext.py`: block = depthwise 7x7 conv (padding 3,
bias) -> LayerNorm over channels (eps 1e-6) -> Linear(d, 4d) -> GELU -> Linear(4d, d) -> layer scale gamma (init
1e-6) -> drop path -> x + branch; stem Conv 4x4 stride 4 + LayerNorm; between stages LayerNorm + Conv 2x2 stride 2;
head: global average pool -> LayerNorm -> Linear; trunc_normal(std 0.02) weights, zero biases.
With a gate (a mask unit on the block input, stride 1), the whole branch counts only at the mask positions:
x + drop_path(mask * branch); no dilated mask, because the depthwise conv reads the dense x. Stem, downsampling
layers and head stay dense.

Our state-dict layout is timm's (`stem.*`, `stages.i.downsample.*`, `stages.i.blocks.j.{conv_dw,norm,mlp.fc1,
mlp.fc2,gamma}`, `head.{norm,fc}`); `convnext_checkpoint_filter` maps the official layout and timm's 1x1-conv MLPs
(the small variants) to it.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.decisions import Dynamic
from dynconv.flops import position_cost
from dynconv.multitarget import per_target
from dynconv.sparse.plans import register_plan
from dynconv.sparse.plans.convnext import ConvNeXtBlockPlan
from .base import TILES_HELP, DynamicNetwork, ModelConfig, check_tiles, drop_path_layer, strip_module_prefix, tiled
from .registry import register_model


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (the official 'channels_first' LayerNorm)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(Dynamic, nn.Module):
    def __init__(self, dim, drop_path=0.0, layer_scale=1e-6, gate_layer=None):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))
        self.drop_path = drop_path_layer(drop_path)
        self.masker = None  # the budget-aware code's name for the gate (keys stages.i.j.masker.*)
        if gate_layer is not None:
            self.masker = gate_layer(dim, stride=1, dilate_stride=1, cost=position_cost(self.conditional_layers()),
                                     dilated_cost=None)

    def conditional_layers(self):
        """The branch, every layer run at the mask positions (per position: 55 C + 8 C^2 MACs)."""
        return (self.conv_dw, self.norm, self.mlp.fc1, self.mlp.act, self.mlp.fc2)

    def uncounted_modules(self, full=False):
        return self.conditional_layers() if self.masker is not None else ()

    def branch(self, x):
        y = self.norm(self.conv_dw(x).permute(0, 2, 3, 1))
        return (self.mlp(y) * self.gamma).permute(0, 3, 1, 2)

    def forward(self, x, target=None):
        """Returns (output, decision or None)."""
        branch = self.drop_path(self.branch(x))
        if self.masker is None:
            return x + branch, None
        decision = self.masker(x, target)
        return torch.addcmul(x, branch, decision.hard), decision


register_plan(ConvNeXtBlock, ConvNeXtBlockPlan)


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim, dim, depth, drop_paths, downsample, **block_args):
        super().__init__()
        self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2)) \
            if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, drop_paths[i], **block_args) for i in range(depth)])


class NormHead(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x.mean((2, 3))))


class ConvNeXt(DynamicNetwork):
    def __init__(self, depths, dims, num_classes=1000, drop_path_rate=0.0, layer_scale=1e-6, gate_layer=None,
                 targets=(), tiles=(1, 1, 1, 1)):
        """`targets` (budgets): a multi-target model, with a gate per target in every block (the budget-aware
        paper's: its per-budget LayerNorm copies are the same tensors, so norms stay shared). `tiles`: the tile
        side per stage of the gates (MaskUnit)."""
        super().__init__()
        if targets and gate_layer is None:
            raise ValueError("a multi-target ConvNeXt needs a gate_layer (one gate per target)")
        tiles = check_tiles(tiles, len(depths))
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        stages, start = [], 0
        for i, (depth, dim) in enumerate(zip(depths, dims)):
            stages.append(ConvNeXtStage(dims[max(i - 1, 0)], dim, depth, rates[start:start + depth], i > 0,
                                        layer_scale=layer_scale,
                                        gate_layer=per_target(tiled(gate_layer, tiles[i]), targets)))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.head = NormHead(dims[-1], num_classes)
        self.apply(_init_weights)

    def uncounted_modules(self, full=False):
        return () if full else (self.head.fc,)  # the budget-aware count: classifier left out

    def forward_features(self, x, target=None):
        x, decisions = self.stem(x), []
        for stage in self.stages:
            x = stage.downsample(x)
            for block in stage.blocks:
                x, decision = block(x, target)
                if decision is not None:
                    decisions.append(decision)
        return x, decisions

    def forward_head(self, x):
        return self.head(x)

    def get_classifier(self):
        return self.head.fc


def _init_weights(module):
    from timm.layers import trunc_normal_  # imported on use, see drop_path_layer

    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


_OFFICIAL = [  # (official key pattern, ours)
    (r"^downsample_layers\.0\.0\.", "stem.0."), (r"^downsample_layers\.0\.1\.", "stem.1."),
    (r"^downsample_layers\.(\d)\.(\d)\.", r"stages.\1.downsample.\2."),
    (r"^stages\.(\d+)\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^stages\.(\d+)\.(\d+)\.(norm|gamma|masker)", r"stages.\1.blocks.\2.\3"),
    (r"^norm\.", "head.norm."), (r"^head\.(weight|bias)$", r"head.fc.\1"),
]


def convnext_checkpoint_filter(state_dict, model=None):
    """Official ConvNeXt files (and the budget-aware code's, with `masker` keys, or `maskerBB` and `norm_BB` in
    its multi-target models) and timm's state dicts to our layout; timm's 1x1-conv MLPs (conv_mlp variants such
    as atto) become Linear weights."""
    state_dict = strip_module_prefix(state_dict)
    out = {}
    for key, value in state_dict.items():
        if re.search(r"\.norm_\d+\.", key):
            continue  # the budget-aware code's per-budget LayerNorm copies: the same tensors as the block's norm
        if not key.startswith(("stem.", "head.norm.", "head.fc.")) and ".blocks." not in key:
            for pattern, ours in _OFFICIAL:
                key = re.sub(pattern, ours, key)
        if re.search(r"\.mlp\.fc[12]\.weight$", key) and value.dim() == 4:
            value = value.flatten(1)
        out[key] = value
    return out


# The budget-aware paper's single-target recipe (its main_single_ema.py): AdamW, cosine per iteration with 20 warm-up
# epochs from 0 to a floor of 1e-6, mixup/cutmix, smoothing, EMA 0.9999; the gates at the full rate, the (pretrained)
# backbone at 0.2x and frozen for 5 epochs; Gumbel temperature 5.0, 2.5 from 30%, 1.0 from 60% of the epochs.
# From scratch, pass --freeze backbone=0 --lr_scale backbone=1.
CONVNEXT_RECIPE = dict(opt="adamw", lr=4e-3, weight_decay=0.05, sched="cosine", warmup_epochs=20, warmup_lr=0.0,
                       min_lr=1e-6, epochs=120, batchsize=64, mixup=0.8, cutmix=1.0, smoothing=0.1, model_ema=True,
                       model_ema_decay=0.9999, drop_path=0.0, lr_scale={"backbone": 0.2}, freeze={"backbone": 5},
                       gumbel_temp=[5.0, 2.5, 1.0], gumbel_temp_epochs=[0.3, 0.6], sparsity_weight=10.0)
CONVNEXT = ModelConfig(interpolation="bicubic", crop_fraction=0.875, checkpoint_filter=convnext_checkpoint_filter,
                       recipe=CONVNEXT_RECIPE, input_multiple=32, options={"tiles": ((1, 1, 1, 1), TILES_HELP)},
                       plot_style=("ConvNeXt", "P", "tab:purple"))

_VARIANTS = {"atto": ((2, 2, 6, 2), (40, 80, 160, 320)), "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
             "pico": ((2, 2, 6, 2), (64, 128, 256, 512)), "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
             "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)), "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
             "base": ((3, 3, 27, 3), (128, 256, 512, 1024))}


@register_model("imagenet", CONVNEXT)
def convnext_atto(**kwargs):
    return ConvNeXt(*_VARIANTS["atto"], **kwargs)


@register_model("imagenet", CONVNEXT)
def convnext_femto(**kwargs):
    return ConvNeXt(*_VARIANTS["femto"], **kwargs)


@register_model("imagenet", CONVNEXT)
def convnext_pico(**kwargs):
    return ConvNeXt(*_VARIANTS["pico"], **kwargs)


@register_model("imagenet", CONVNEXT)
def convnext_nano(**kwargs):
    return ConvNeXt(*_VARIANTS["nano"], **kwargs)


@register_model("imagenet", CONVNEXT)
def convnext_tiny(**kwargs):
    return ConvNeXt(*_VARIANTS["tiny"], **kwargs)


@register_model("imagenet", CONVNEXT)
def convnext_small(**kwargs):
    return ConvNeXt(*_VARIANTS["small"], **kwargs)


@register_model("imagenet", CONVNEXT)
def convnext_base(**kwargs):
    return ConvNeXt(*_VARIANTS["base"], **kwargs)
