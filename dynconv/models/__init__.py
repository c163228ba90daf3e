from . import convnext, dgc, pedconv, resnet_cifar, resnet_imagenet  # noqa: F401  (registers the models)
from .base import CheckpointMismatch, Decides, DynamicNetwork, ModelConfig, WeightsUnavailable  # noqa: F401
from .build import ModelOptionError, UnknownModelOption, build_model  # noqa: F401
from .registry import create_model, list_models, model_config, model_family, register_model  # noqa: F401
