"""The one way a model is made (as timm's create_model with build_model_with_cfg): from its name, what the run
has it decide, its options and its class count. Every entry script, the teacher, the result scripts and the
benchmarks call `build_model`; weights go in afterwards through `dynconv.utils.checkpoint.load_weights`, which
reads every layout the model's config can filter."""
from dynconv.maskunit import MaskUnit
from dynconv.multitarget import tie_norms
from .base import Decides
from .registry import create_model, model_config


class ModelOptionError(ValueError):
    """Values the model's architecture cannot have (e.g. DGC heads that do not divide a width)."""


class UnknownModelOption(ModelOptionError):
    """An option the model's factory does not take; the message names it."""


def build_model(name, num_classes=None, *, spatial_gates=False, targets=(), options=None, drop_path_rate=0.0,
                tied_norms=False):
    """The registered model `name`. `spatial_gates`: DynConv mask units in every block of a family that decides
    where to compute (one per budget and block with `targets`, which alone also asks for them); `options`: the
    model's own options (e.g. tiles, DGC heads); `tied_norms`: one affine per per-target norm, the budget-aware
    code's choice when the model starts from pretrained weights. None for num_classes: the model's default."""
    kwargs = dict(options or {})
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if targets:
        kwargs["targets"] = tuple(float(t) for t in targets)
    if (spatial_gates or targets) and model_config(name).gates is Decides.SPATIAL:
        kwargs["gate_layer"] = MaskUnit
    try:
        model = create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise UnknownModelOption(f"{name} does not take {str(e).split('argument')[-1].strip()}")
        raise
    except ValueError as e:
        raise ModelOptionError(f"{name}: {e}")
    if tied_norms:
        tie_norms(model)
    return model
