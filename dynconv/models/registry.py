"""One registry of model names (timm style): the scripts' `--model` choices and each model's config come from here."""
_MODELS = {}  # name -> (family, factory, ModelConfig)


def register_model(family, config):
    """Decorator: registers a factory under its function name, in a family ("cifar", "imagenet"), with its
    ModelConfig (models/base.py)."""
    def register(fn):
        _MODELS[fn.__name__] = (family, fn, config)
        return fn
    return register


def list_models(family=None):
    return sorted(name for name, (fam, _, _) in _MODELS.items() if family in (None, fam))


def _entry(name, family=None):
    if name not in list_models(family):
        raise KeyError(f"unknown model '{name}' (choices: {', '.join(list_models(family))})")
    return _MODELS[name]


def create_model(name, family=None, **kwargs):
    """The model `name` built by its factory with `kwargs` (gate_layer, num_classes, model options)."""
    return _entry(name, family)[1](**kwargs)


def model_config(name):
    return _entry(name)[2]


def model_family(name):
    return _entry(name)[0]


def model_factory(name):
    return _entry(name)[1]
