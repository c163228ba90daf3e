"""One registry of model names (timm style): the scripts' `--model` choices come from here."""
_MODELS = {}  # name -> (family, factory)


def register_model(family):
    """Decorator: registers a factory under its function name, in a family ("cifar", "imagenet")."""
    def register(fn):
        _MODELS[fn.__name__] = (family, fn)
        return fn
    return register


def list_models(family=None):
    return sorted(name for name, (fam, _) in _MODELS.items() if family in (None, fam))


def create_model(name, family=None, **kwargs):
    if name not in list_models(family):
        raise KeyError(f"unknown model '{name}' (choices: {', '.join(list_models(family))})")
    return _MODELS[name][1](**kwargs)
