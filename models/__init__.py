from . import resnet_cifar, resnet_imagenet  # noqa: F401  (registers the models)
from .registry import create_model, list_models, register_model  # noqa: F401
