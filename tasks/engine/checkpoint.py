"""Model checkpoints: a folder (local path or fsspec URI) with ``model.pt`` + ``model.json``.

``model.pt`` is a plain state_dict (loadable without fermine); ``model.json`` holds what is needed to
use it: the task (classification or valence_arousal), the method that trained it, architecture (and for
networks other than tasks.models' FERNet the function that rebuilds them), class names, input size,
normalisation, metrics and the training config. Every method writes this one format (tasks.engine).
Every file is written to a temporary sibling and renamed, so a reader never sees a partial file;
``model.json`` is written last and records the sha256 of ``model.pt``, so a pair torn by a crash
between the two renames is detected instead of loaded.

The training state (``last.pt``: the method's state, optimisers, epoch, history, the run's fingerprint)
lives in the same folder and is what tasks.engine.fit continues from.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import uuid
from typing import Any, Mapping

import fsspec
import torch
from torch import nn

from storage.schema import CLASSES
from tasks.models import FERNet, build_model

MODEL_FILE = "model.pt"
META_FILE = "model.json"
STATE_FILE = "last.pt"
_TMP = "_tmp-"
FORMAT = 2  # 1: FERNet only, no "task" / "model" fields (still loads: both default to a FERNet classifier)
FERNET = "fernet"  # meta["model"]["builder"] of tasks.models.build_model networks

__all__ = [
    "atomic_write_bytes",
    "build_network",
    "checkpoint_exists",
    "load_checkpoint",
    "load_training_state",
    "read_meta",
    "save_checkpoint",
    "save_training_state",
    "weights_digest",
]


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def atomic_write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` via a temporary sibling + rename (atomic on local disks and memory://)."""
    fs, path = _fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{_TMP}{uuid.uuid4().hex}"
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def _json_safe(obj: Any) -> Any:
    """JSON has no NaN/inf: they become null (e.g. the accuracy of a class absent from a test set)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _json_safe(obj.item())
    return obj


def dumps_json(obj: Any) -> str:
    return json.dumps(_json_safe(obj), indent=2, sort_keys=True, default=str)


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def save_checkpoint(uri_dir: str, model: nn.Module, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Atomically write ``model.pt`` then ``model.json``; returns the meta written.

    ``meta`` may give task, classes, input_size, mean, std, metrics, method, config; for a FERNet, arch,
    num_classes and feature_dim come from the model. Any other network needs ``meta["model"]`` =
    {"builder": "package.module:function", ...}: the function that rebuilds it from this meta
    (:func:`load_checkpoint` calls it), and ``num_classes`` (its outputs).
    """
    from tasks.data import MEAN, STD

    buf = io.BytesIO()
    # Always a CPU state_dict: a checkpoint saved on a GPU loads on a CPU-only machine.
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    data = buf.getvalue()
    out: dict[str, Any] = {"task": "classification", "input_size": None, "mean": list(MEAN), "std": list(STD),
                           "metrics": {}, "config": {}}
    out.update(dict(meta or {}))
    if isinstance(model, FERNet):
        out.update({"arch": model.arch, "num_classes": model.num_classes, "feature_dim": model.feature_dim,
                    "model": {"builder": FERNET}})
    elif not isinstance(out.get("model"), Mapping) or ":" not in str(out["model"].get("builder", "")) \
            or "num_classes" not in out:
        raise ValueError(f"saving a {type(model).__name__} needs meta['model'] = {{'builder': 'module:function'}} "
                         "and meta['num_classes']")
    k = int(out["num_classes"])
    out.setdefault("classes", list(CLASSES[:k]) if k <= len(CLASSES) else None)
    out.update({"format": FORMAT, "model_sha256": hashlib.sha256(data).hexdigest()})
    if out.get("classes") is not None and len(out["classes"]) != k:
        raise ValueError(f"meta lists {len(out['classes'])} classes but the model has {k} outputs")
    atomic_write_bytes(_join(uri_dir, MODEL_FILE), data)
    atomic_write_bytes(_join(uri_dir, META_FILE), dumps_json(out).encode())
    return out


def build_network(meta: Mapping[str, Any]) -> nn.Module:
    """An untrained network of the architecture ``meta`` (a model.json) describes.

    A builder other than FERNet's is imported by name. Only checkpoints of such a network reach that
    import, and the stages that load them import the network's module themselves, so the stage code
    versions (flows/code_version.py, which counts a dynamic import as its own package, tasks.engine)
    still cover it."""
    builder = (meta.get("model") or {}).get("builder", FERNET)
    if builder == FERNET:
        return build_model(meta["arch"], int(meta["num_classes"]))
    module, _, name = builder.partition(":")
    return getattr(importlib.import_module(module), name)(meta)


def checkpoint_exists(uri_dir: str) -> bool:
    fs, path = _fs(uri_dir)
    return fs.exists(f"{path}/{META_FILE}") and fs.exists(f"{path}/{MODEL_FILE}")


def read_meta(uri_dir: str) -> dict[str, Any]:
    fs, path = _fs(uri_dir)
    if not fs.exists(f"{path}/{META_FILE}"):
        if fs.exists(f"{path}/featloss.json"):
            raise FileNotFoundError(
                f"{uri_dir} is a feature-loss model in the format of fermine 0.1 (featloss.json), which predates the "
                "common checkpoint format; retrain it with `fermine featloss train` into a new folder."
            )
        if fs.exists(path):
            raise FileNotFoundError(
                f"{uri_dir} has no {META_FILE}: training there did not finish. "
                "Rerun the training command with the same output to resume it."
            )
        raise FileNotFoundError(f"no checkpoint at {uri_dir}: check the path")
    return json.loads(fs.cat_file(f"{path}/{META_FILE}").decode())


def load_checkpoint(uri_dir: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Load a checkpoint folder; returns (model in eval mode on ``device``, meta)."""
    meta = read_meta(uri_dir)
    fs, path = _fs(uri_dir)
    data = fs.cat_file(f"{path}/{MODEL_FILE}")
    want = meta.get("model_sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise ValueError(
            f"{uri_dir}/{MODEL_FILE} does not match the checksum in {META_FILE} (a write was interrupted or "
            "the file was replaced); retrain or restore the checkpoint"
        )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = build_network(meta)
    model.load_state_dict(state)
    model.to(device).eval()
    return model, meta


def weights_digest(path: str) -> str:
    """The digest of starting weights (an init checkpoint, pretrained weights): a checkpoint folder's
    model_sha256 (model.json), else the sha256 of the weights file. Part of a run's resume fingerprint."""
    fs, p = _fs(path)
    if fs.isdir(p):
        if fs.exists(f"{p}/{META_FILE}"):
            sha = json.loads(fs.cat_file(f"{p}/{META_FILE}").decode()).get("model_sha256")
            if sha:
                return str(sha)
        p = f"{p}/{MODEL_FILE}"
    if not fs.exists(p):
        raise FileNotFoundError(f"weights not found: {path} (give a local .pt/.pth file or a checkpoint folder)")
    return hashlib.sha256(fs.cat_file(p)).hexdigest()


def module_digest(module: nn.Module) -> str:
    """The sha256 of a network's weights and buffers (names, dtypes, shapes, values): what an in-memory
    network given to a training (a frozen teacher) contributes to its resume fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_training_state(uri_dir: str, state: Mapping[str, Any]) -> None:
    """Atomically write the resumable training state (``last.pt``).

    Keep it to tensors, numbers, strings, lists, dicts and None (e.g. ``array.tolist()``, not numpy
    arrays): :func:`load_training_state` reads it with torch's safe (weights-only) loader.
    """
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    atomic_write_bytes(_join(uri_dir, STATE_FILE), buf.getvalue())


def load_training_state(uri_dir: str) -> dict[str, Any] | None:
    """The training state in ``uri_dir``, or None when there is none."""
    fs, path = _fs(uri_dir)
    p = f"{path}/{STATE_FILE}"
    if not fs.exists(p):
        return None
    # The state holds tensors, numbers, strings, lists, dicts and None only (RNG states as torch tensors),
    # so the safe loader suffices: a state file can never run code when loaded.
    try:
        return torch.load(io.BytesIO(fs.cat_file(p)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{uri_dir}/{STATE_FILE} cannot be read ({type(e).__name__}: {str(e)[:200]}); it is corrupt or holds "
            "objects other than tensors, numbers, strings, lists and dicts. Delete it, or use --no-resume."
        ) from None
