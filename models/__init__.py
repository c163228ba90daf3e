from . import resnet, resnet_cifar  # noqa: F401  (registers the models)
from .registry import create_model, list_models, register_model  # noqa: F401
