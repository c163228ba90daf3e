"""Checkpoints: written atomically, read with weights_only=True, matched to the model with clear errors.

Format (the reference's keys plus ours): state_dict, optimizer, epoch (epochs completed = the epoch to
resume at), best_prec1, scheduler, args (a plain dict), version.
"""
import os
import tempfile

import torch

from .errors import UserError

CHECKPOINT_VERSION = 1
LATEST, BEST = "checkpoint.pth", "checkpoint_best.pth"


def save_checkpoint(state, path):
    """Writes to a temporary file in the same directory, then renames: a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".pth")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def resolve_checkpoint(path):
    """A checkpoint file, or a directory holding checkpoint.pth; None when the directory has none yet."""
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    return path if os.path.isfile(path) else None


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
    if isinstance(checkpoint, dict) and "state_dict" not in checkpoint and all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        checkpoint = {"state_dict": checkpoint}  # a bare state dict
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise UserError(f"{path} is not a checkpoint (expected a dict with a 'state_dict')")
    return checkpoint


def _strip_prefix(state_dict, prefix="module."):
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _summarise(keys, limit=3):
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_state(model, state_dict, source, allow_missing=()):
    """Loads strictly; a mismatch becomes one line naming the missing/unexpected keys and the likely cause.

    Keys of the model containing one of `allow_missing` may be absent and keep their initialisation (e.g.
    ".masker." when dense weights start a DynConv model).
    """
    state_dict = _strip_prefix(state_dict)
    own = model.state_dict()
    unexpected = set(state_dict) - set(own)
    missing = {k for k in set(own) - set(state_dict) if not any(p in k for p in allow_missing)}
    problems = []
    if missing:
        problems.append(f"missing keys {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_summarise(unexpected)}")
    if any(".masker." in k for k in missing):
        problems.append("the checkpoint is a dense model: use --budget -1")
    elif any(".masker." in k for k in unexpected):
        problems.append("the checkpoint is a DynConv model: pass its --budget")
    shapes = [k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape]
    if shapes:
        problems.append(f"shape mismatch at {_summarise(shapes)} (another architecture or number of classes?)")
    if problems:
        raise UserError(f"{source} does not fit this model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=not allow_missing)
