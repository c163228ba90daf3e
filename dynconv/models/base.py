"""What every model shares: the forward contract and the per-model configuration.

Forward: `model(x, target=None) -> (logits, decisions)`, one Decision per dynamic layer (an empty list for a
static network). `target` selects an operating point in models that have several (e.g. a budget); single models
ignore it. The per-model `ModelConfig` holds what a user should not have to know: data normalisation, the
evaluation resize and crop, the default training recipe, where pretrained weights come from and how foreign
checkpoint formats map to ours.
"""
import enum
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.nn as nn

from dynconv.decisions import Dynamic, take_recorded
from dynconv.multitarget import per_target_layout, selected_target

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Decides(enum.Enum):
    """What a family of models decides per image (ModelConfig.gates), and what one run's network decides
    (dynconv.utils.settings.decides): the same kinds, plus NOTHING for a spatial family's static network."""
    SPATIAL = "spatial"  # where to compute: DynConv mask units, added when the run has a budget (or several)
    OWN = "own"  # which channels: gates of the model's own (e.g. DGC), always there; the sparse engine runs them
    WEIGHTS = "weights"  # with which weights (e.g. PEDConv): nothing for a gate to decide
    NOTHING = "nothing"  # a run's network only: a spatial family's without a budget (--budget -1), static

    @property
    def gated(self):
        """Gates that the sparse engine turns into skipped work (spatial masks, chosen channels)."""
        return self in (Decides.SPATIAL, Decides.OWN)


class WeightsUnavailable(Exception):
    """Published weights that cannot be had here (not cached, no network); the message says what to do."""


class CheckpointMismatch(ValueError):
    """A checkpoint built for another configuration of the model; the message says which option differs."""


def strip_module_prefix(state_dict, model=None):
    """The checkpoint filter of models whose foreign formats differ from ours only by DataParallel's 'module.'."""
    prefix = "module."
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


TILES_HELP = ("tile side in pixels per stage for the spatial gates (1: per-position masks; a side >= the stage's "
              "map: one decision per block and image)")


def tiles_problem(tiles, stages):
    """Why `tiles` (one tile side per stage, see MaskUnit) cannot configure a model of `stages` stages, or None."""
    tiles = tuple(tiles) if isinstance(tiles, (tuple, list)) else (tiles,)
    if len(tiles) != stages:
        return f"tiles needs one side per stage: {stages} values (got {len(tiles)})"
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiles):
        return f"tile sides must be positive integers (got {' '.join(map(str, tiles))})"
    return None


def check_tiles(tiles, stages):
    """`tiles` as a tuple of `stages` sides; ValueError when it cannot be one."""
    problem = tiles_problem(tiles, stages)
    if problem:
        raise ValueError(problem)
    return tuple(tiles)


def drop_path_layer(rate):
    """timm's DropPath at `rate`, or an Identity at 0 (timm imported here: it takes seconds, and a model module
    is imported before the command line's flags are checked)."""
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


def tiled(gate_layer, tile):
    """A gate factory whose gates decide per `tile` x `tile` tile (the factory itself at tile 1, or without one)."""
    if gate_layer is None or tile == 1:
        return gate_layer
    return functools.partial(gate_layer, tile=tile)


@dataclass
class ModelConfig:
    mean: tuple = IMAGENET_MEAN  # input normalisation
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"  # evaluation resize (torchvision InterpolationMode name)
    crop_fraction: float = 0.875  # evaluation: resize to resolution / crop_fraction, then centre-crop
    recipe: dict = field(default_factory=dict)  # training defaults: flag name -> value (utils/cli.py's flags)
    # pretrained(model_name) -> state dict of published weights (raises UserError when they cannot be had)
    pretrained: Optional[Callable] = None
    # checkpoint_filter(state_dict, model) -> state dict in our layout (reference, torchvision, upstream formats)
    checkpoint_filter: Callable = strip_module_prefix
    input_multiple: int = 1  # the input side must be a multiple of this (the network's total stride)
    # model options the command line sets as flags (--name VALUE): name -> (default, help); recorded in model_kwargs
    options: dict = field(default_factory=dict)
    free_options: tuple = ()  # options that leave the weights alone (e.g. an evaluation path): may differ on -r
    # the model options that make the same network decide nothing (e.g. DGC's gate factor 1: every channel kept),
    # for models whose gates are their own; spatial gates have theirs: no gate_layer (the dense network)
    static_options: Optional[dict] = None
    # backbone(model) -> the same network without its dynamic layers (e.g. DGC's convs as plain BN-ReLU-convs):
    # the static network they are built on, a reference for their speed (benchmarks/train_speed.py's `backbone` row)
    backbone: Optional[Callable] = None
    gates: Decides = Decides.SPATIAL
    # (label, fn(model, images) -> MMac per image): a second MAC count, e.g. as the model's paper counts them
    paper_count: Optional[tuple] = None
    # a module of benchmarks/ that times this model's own evaluation paths (speedtest.py hands it the models that
    # have no spatial gates); it defines speedtest_argv(name, resolution, batch_sizes, runs, warmup) and main(argv)
    speed_benchmark: Optional[str] = None
    # the method's name in result tables and plots (e.g. "PEDConv"); None: DynConv, or dense without a budget
    method: Optional[str] = None
    # (family, marker, colour): how the comparison plots draw this model's runs, dense or dynamic alike (e.g.
    # ("ConvNeXt", "P", "tab:purple")); None: DynConv's own (dense, one budget, multi-target: utils/plot.py)
    plot_style: Optional[tuple] = None

    def filter(self, state_dict, model):
        """A checkpoint in our layout for `model`: the model's checkpoint_filter, then the layout of its
        per-target layers when it is multi-target (dynconv/multitarget.py)."""
        return per_target_layout(self.checkpoint_filter(state_dict, model), model)


class DynamicNetwork(Dynamic, nn.Module):
    """Base of the models: forward = forward_features (stem + blocks, collecting decisions) + forward_head."""

    def forward_features(self, x, target=None):
        """(features, decisions)."""
        raise NotImplementedError

    def forward_head(self, x):
        raise NotImplementedError

    def get_classifier(self):
        """The final Linear (timm's name): replaced when weights for another number of classes are loaded."""
        raise NotImplementedError

    def forward(self, x, target=None):
        with selected_target(self, target):  # the norms etc. of this operating point, in multi-target models
            x, decisions = self.forward_features(x, target)
            # layers inside blocks that could only return a tensor (e.g. injected conv layers) recorded theirs
            return self.forward_head(x), decisions + take_recorded(self)
