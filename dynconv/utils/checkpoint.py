"""Checkpoints: written atomically, read with weights_only=True, matched to the model with clear errors.

Format (the reference's keys plus ours): state_dict, optimizer, epoch (epochs completed = the epoch to
resume at), best_prec1, args (a plain dict), version; with EMA also the EMA weights (utils/recipe.EMA_KEY) and
best_ema_prec1. The EMA's own files (checkpoint_ema.pth, checkpoint_best_ema.pth) hold its weights as their
state_dict, so `-r FILE -e` evaluates them like any checkpoint.
"""
import hashlib
import os
import pickle
import re
import tempfile

import torch

from dynconv.gates import gate_state_keys
from dynconv.models.base import CheckpointMismatch
from .errors import UserError

CHECKPOINT_VERSION = 2
LATEST, BEST = "checkpoint.pth", "checkpoint_best.pth"
EMA, BEST_EMA = "checkpoint_ema.pth", "checkpoint_best_ema.pth"


class SaveFailed(UserError):
    """A checkpoint could not be written (a full disk, a quota, a removed folder): the previous one is intact."""


def save_checkpoint(state, path):
    """Writes to a temporary file in the same directory, then renames: a crash never leaves half a file. An
    OSError (e.g. no space left on device) is one line (SaveFailed); the file at `path` is then the previous one."""
    try:
        _write_atomically(state, path)
    except OSError as e:
        kept = "the previous one is intact" if os.path.exists(path) else "none was there before"
        raise SaveFailed(f"cannot write {path} ({e.strerror or type(e).__name__}); {kept}") from None


def _write_atomically(state, path):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".pth")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets: a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _numpy_scalars():
    """What numpy float scalars (e.g. learning rates in some papers' optimizer states) pickle as, allowed in
    weights_only loading: the scalar constructor (under numpy 1's module name too) and the float dtypes; nothing
    else is unpickled."""
    import numpy as np

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64)]
    return [np.dtype, *dtypes, scalar, (scalar, "numpy.core.multiarray.scalar")]


SHIPPED_LIMIT = 10 * 2 ** 20  # bytes: a shipped (stripped) checkpoint over this is stored in half precision
STORED_AS = "stored_as"  # the key that marks a checkpoint whose floating-point weights are stored as float16


def stripped(checkpoint, keep, limit=SHIPPED_LIMIT):
    """What a shipped checkpoint keeps (the keys `keep`: weights and the metadata -e needs, no optimizer state);
    its floating-point weights in float16 when float32 would take more than `limit` bytes, marked by STORED_AS.
    load_checkpoint turns them back into float32, so every reader (-e, --pretrained, --teacher_weights, the
    benchmarks) sees float32 weights; the numbers shipped with such a file are evaluated from the file itself."""
    kept = {k: checkpoint[k] for k in keep if k in checkpoint}
    size = sum(v.numel() * v.element_size() for v in kept["state_dict"].values() if isinstance(v, torch.Tensor))
    if size <= limit:
        return kept
    half = {k: v.half() if _fits_half(v) else v for k, v in kept["state_dict"].items()}
    return {**kept, "state_dict": half, STORED_AS: "float16"}


def _fits_half(value):
    """A float32 tensor that float16 can hold: tensors with values beyond float16's range (e.g. a BatchNorm's
    running variance over 65504, as in a trained DGC network) stay float32, instead of turning into infinities."""
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32):
        return False
    return value.numel() == 0 or bool(value.abs().max() <= torch.finfo(torch.float16).max)


def _as_float32(checkpoint):
    """A checkpoint stored in half precision (see stripped) with its weights back in float32."""
    if checkpoint.get(STORED_AS) != "float16":
        return checkpoint
    state = {k: v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.float16 else v
             for k, v in checkpoint["state_dict"].items()}
    return {**checkpoint, "state_dict": state}


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # torch.save's zip archive, or a legacy pickle
        raise UserError(f"{path} is not a readable checkpoint (not a file written by torch.save)")
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: loading it could run code
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise UserError(f"{path} is not a readable checkpoint: it holds Python objects other than tensors and "
                        "plain values" + (f" ({found.group(1)})" if found else "") + ", and loading those could "
                        "run code; refused")
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint: damaged or not written by torch.save "
                        f"({type(e).__name__})")
    if isinstance(checkpoint, dict) and "state_dict" not in checkpoint and isinstance(checkpoint.get("model"), dict):
        checkpoint = {**checkpoint, "state_dict": checkpoint.pop("model")}  # {"model": ...}: e.g. official ConvNeXt, DeiT
    if isinstance(checkpoint, dict) and "state_dict" not in checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {"state_dict": checkpoint}  # a bare state dict
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path} is not a checkpoint (expected a dict with a 'state_dict')")
    return _as_float32(checkpoint)


def load_published(url):
    """The state dict of published weights at `url` (e.g. torchvision's), from the torch hub cache
    ($TORCH_HOME/hub/checkpoints/<file name>) or downloaded into it, checked against the SHA-256 prefix that the
    file name carries (torchvision's convention, `name-<hash prefix>.pth`) and then read with load_checkpoint
    (weights_only=True): a tampered cache file is refused before anything in it is unpickled. Download failures
    raise OSError (the caller words them)."""
    from torch.hub import HASH_REGEX, download_url_to_file, get_dir

    name = os.path.basename(url)
    path = os.path.join(get_dir(), "checkpoints", name)
    match = HASH_REGEX.search(name)
    prefix = match.group(1) if match else None
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        download_url_to_file(url, path, hash_prefix=prefix, progress=False)  # checks the hash before the rename
    elif prefix and not _sha256(path).startswith(prefix):
        raise UserError(f"{path} is not the published file (its SHA-256 does not start with {prefix}, as {url} "
                        "does): refused; delete it and run again to download the published one")
    return load_checkpoint(path)["state_dict"]


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def filtered_weights(model, config, state_dict, source):
    """`state_dict` in any layout the model's config filters (ours, the reference's, upstream, torchvision), in
    ours; weights holding NaN or infinity are refused (they evaluate to chance, silently), and a checkpoint of
    another configuration is one line naming `source`."""
    bad = non_finite_keys(state_dict)
    if bad:
        raise UserError(f"{source} holds NaN or infinite weights ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
                        ": refused (the run that wrote it diverged)")
    try:
        return config.filter(state_dict, model)
    except CheckpointMismatch as e:
        raise UserError(f"{source} was trained with other options: {e}")


def load_weights(model, config, state_dict, source, fresh_gates=False, new_classifier=False):
    """filtered_weights() into `model`, strictly, each problem one line naming `source`. `fresh_gates`: gates may
    be absent and keep their initialisation (dense weights starting a gated model); `new_classifier`: a
    classifier of another class count is left at its initialisation."""
    state_dict = filtered_weights(model, config, state_dict, source)
    allow_missing = gate_state_keys(model) if fresh_gates else set()
    if new_classifier:
        classifier, own = set(classifier_keys(model)), model.state_dict()
        if any(k in state_dict and state_dict[k].shape != own[k].shape for k in classifier):
            state_dict = {k: v for k, v in state_dict.items() if k not in classifier}
            allow_missing |= classifier
    load_model_state(model, state_dict, source, allow_missing=allow_missing)


def non_finite_keys(state_dict):
    """Names of the floating-point tensors of a state dict that hold NaN or infinity."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def _summarise(keys, limit=3):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_state(model, state_dict, source, allow_missing=()):
    """Loads a state dict already in our layout (see ModelConfig.checkpoint_filter) strictly; a mismatch
    becomes one line naming the missing/unexpected keys. Keys in `allow_missing` (exact names, e.g. the gates'
    parameters when dense weights start a DynConv model) may be absent and keep their initialisation."""
    own = model.state_dict()
    unexpected = set(state_dict) - set(own)
    missing = set(own) - set(state_dict) - set(allow_missing)
    problems = []
    if missing:
        problems.append(f"missing keys {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_summarise(unexpected)}")
    if missing and missing <= gate_state_keys(model):
        problems.append("the checkpoint has no gates (a static model): use --budget -1")
    shapes = [k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape]
    if shapes:
        problems.append(_shape_problem(model, own, state_dict, shapes))
    if problems:
        raise UserError(f"{source} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=False)


def _shape_problem(model, own, state_dict, shapes):
    """The shape mismatch in words: another number of classes when only the classifier differs."""
    head = classifier_keys(model) if hasattr(model, "get_classifier") else []
    weight = next((k for k in head if k.endswith("weight")), None)
    if weight in shapes and set(shapes) <= set(head):
        return (f"its classifier has {state_dict[weight].shape[0]} classes and the data {own[weight].shape[0]} "
                "(--pretrained PATH starts from it with a new classifier)")
    return f"shape mismatch at {_summarise(shapes)} (another architecture or number of classes?)"


def classifier_keys(model):
    """State-dict keys of the model's classifier (timm's get_classifier())."""
    classifier = model.get_classifier()
    prefix = next(name for name, m in model.named_modules() if m is classifier)
    return [f"{prefix}.{k}" for k in classifier.state_dict()]


def rng_state():
    """The random generators' states (torch, numpy, Python) in a form weights_only loading accepts, so that a
    resumed run draws the same data order, noise and mixup as an uninterrupted one."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)}}


def restore_rng(state):
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
