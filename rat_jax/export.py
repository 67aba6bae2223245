"""Export a (soup) model: back to a PyTorch state dict, or as a standalone Orbax checkpoint.

The torch side is the exact inverse of `rat_jax.convert`'s key map (see converter.py):
``featurizer/layer1_0/conv1/kernel`` -> ``layer1.0.conv1.weight`` (torchvision) and
``featurizer/blocks_3/expand_conv/kernel`` -> ``_blocks.3._expand_conv.weight``
(efficientnet_pytorch: every module name gets back its leading '_'); conv kernels HWIO -> OIHW
(depthwise ``(k,k,1,C)`` -> ``(C,1,k,k)``), Dense ``[in, out]`` -> ``[out, in]``, BN
scale/bias/mean/var -> weight/bias/running_mean/running_var plus ``num_batches_tracked = 0``, and
the head ``classifier`` -> ``fc`` (torchvision) / ``_fc`` (efficientnet_pytorch). Every key is
checked to map back to the path it came from, so `convert_torch_checkpoint` of the file gives the
same variables.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np
import safetensors.numpy

__all__ = ["torch_layout", "flax_path_to_torch_key", "to_torch_state_dict", "export_torch",
           "write_safetensors", "export_flax", "load_flax_export", "EXPORT_FORMAT"]

EXPORT_FORMAT = "rat_jax.flax_export.v1"
_BN_STATS = {"mean": "running_mean", "var": "running_var"}


def torch_layout(arch: str) -> str:
    """'efficientnet_pytorch' for EfficientNets (underscored module names), else 'torchvision'."""
    return "efficientnet_pytorch" if arch.startswith("efficientnet") else "torchvision"


def _module_parts(flax_parts, underscore: bool) -> list[str]:
    out = []
    for p in flax_parts:
        head, sep, idx = p.rpartition("_")
        if sep and head and idx.isdigit():
            out += [("_" + head) if underscore else head, idx]
        else:
            out.append(("_" + p) if underscore else p)
    return out


def flax_path_to_torch_key(path: tuple[str, ...], arch: str) -> str:
    """``(collection, *module path, leaf)`` -> the torch state-dict key of that tensor."""
    collection, *mods, leaf = path
    underscore = torch_layout(arch) == "efficientnet_pytorch"
    if mods and mods[0] == "classifier":
        return ("_fc" if underscore else "fc") + "." + {"kernel": "weight"}.get(leaf, leaf)
    if not mods or mods[0] != "featurizer":
        raise ValueError(f"export: unexpected variable path {'/'.join(path)!r} (neither featurizer "
                         "nor classifier)")
    module = ".".join(_module_parts(mods[1:], underscore))
    if collection == "batch_stats":
        if leaf not in _BN_STATS:
            raise ValueError(f"export: unexpected batch_stats leaf {'/'.join(path)!r}")
        torch_leaf = _BN_STATS[leaf]
    else:
        torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}.get(leaf, leaf)
    return f"{module}.{torch_leaf}"


def _to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)   # HWIO -> OIHW; depthwise (k,k,1,C) -> (C,1,k,k)
    if leaf == "kernel" and value.ndim == 2:
        return value.T                       # Dense [in, out] -> Linear [out, in]
    return value


def to_torch_state_dict(variables: Mapping[str, Any], arch: str) -> dict[str, np.ndarray]:
    """``{'params', 'batch_stats'}`` -> ``{torch key: numpy array}`` in the torch layout of `arch`
    (float32, C-contiguous), with ``num_batches_tracked = 0`` (int64) for every BatchNorm."""
    from flax.traverse_util import flatten_dict
    from rat_jax.convert.converter import torch_key_to_flax

    flat = flatten_dict({"params": variables["params"],
                         "batch_stats": variables.get("batch_stats", {})})
    out: dict[str, np.ndarray] = {}
    bn_modules = []
    for path, value in flat.items():
        key = flax_path_to_torch_key(path, arch)
        arr = np.ascontiguousarray(_to_torch_layout(path[-1], np.asarray(value, np.float32)))
        # The converter must map the key straight back (it canonicalizes fc/_fc to classifier).
        canon = "classifier." + key.split(".", 1)[1] if key.split(".")[0] in ("fc", "_fc") else key
        back, _ = torch_key_to_flax(canon, arr)
        if tuple(back) != tuple(path):
            raise ValueError(f"export: {'/'.join(path)} -> {key!r} does not map back "
                             f"(converter gives {'/'.join(back)})")
        if key in out:
            raise ValueError(f"export: two variables map to the torch key {key!r}")
        out[key] = arr
        if path[0] == "batch_stats" and path[-1] == "mean":
            bn_modules.append(key.rsplit(".", 1)[0])
    for mod in bn_modules:
        out[f"{mod}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> pathlib.Path:
    """Write a .safetensors file with the `safetensors` package (atomically: temp file, rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp),
                                metadata={str(k): str(v) for k, v in metadata.items()}
                                if metadata else None)
    os.replace(tmp, path)
    return path


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def export_torch(path: str | os.PathLike, variables: Mapping[str, Any], arch: str,
                 format: str = "auto") -> pathlib.Path:
    """Write the model as a PyTorch state dict; returns the file written.

    format: 'pth' (torch.save; needs torch), 'safetensors', or 'auto' (from the suffix of `path`
    when it is .pth/.pt/.safetensors, else .pth when torch is importable and .safetensors
    otherwise, the suffix appended). The file loads with ``model.load_state_dict`` into
    torchvision's ``resnet18/50`` / efficientnet_pytorch's model (head ``fc`` / ``_fc``), and with
    ``rat_jax.convert.convert_torch_checkpoint(path, arch)``.
    """
    if format not in ("auto", "pth", "safetensors"):
        raise ValueError(f"export_torch: format={format!r}; use 'auto', 'pth' or 'safetensors'")
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if format == "auto":
        if suffix in (".pth", ".pt"):
            format = "pth"
        elif suffix == ".safetensors":
            format = "safetensors"
        else:
            format = "pth" if _torch_available() else "safetensors"
            path = path.with_name(path.name + (".pth" if format == "pth" else ".safetensors"))
    state = to_torch_state_dict(variables, arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "safetensors":
        return write_safetensors(path, state, {"format": "pt", "arch": arch,
                                               "layout": torch_layout(arch)})
    if not _torch_available():
        raise RuntimeError(f"export_torch: writing {path} as .pth needs torch; install it or "
                           "pass format='safetensors'")
    import collections
    import torch
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items())
    tmp = path.with_name(path.name + ".tmp")
    torch.save(tensors, tmp)
    os.replace(tmp, path)
    return path


def export_flax(directory: str | os.PathLike, variables: Mapping[str, Any],
                config_dict: Mapping[str, Any] | None = None, *, arch: str | None = None,
                num_classes: int | None = None, force: bool = False) -> pathlib.Path:
    """A standalone Orbax checkpoint of ``{'params', 'batch_stats'}`` (`rat_jax.checkpoint`) with
    metadata {format, arch, num_classes, config}; `arch` defaults to ``config_dict['arch']``."""
    from rat_jax.checkpoint import save_pytree

    config = dict(config_dict or {})
    arch = arch or config.get("arch")
    if arch is None:
        raise ValueError("export_flax: pass arch= or a config_dict with an 'arch' entry")
    if num_classes is None:
        num_classes = int(np.shape(variables["params"]["classifier"]["bias"])[-1])
    tree = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    meta = {"format": EXPORT_FORMAT, "arch": arch, "num_classes": int(num_classes),
            "config": _jsonable(config)}
    return save_pytree(directory, tree, metadata=meta, force=force)


def load_flax_export(directory: str | os.PathLike) -> tuple[dict, dict]:
    """(variables, metadata) of a directory written by :func:`export_flax`."""
    from rat_jax.checkpoint import load_metadata, restore_pytree

    meta = load_metadata(directory)
    tree = restore_pytree(directory)
    return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}, meta


def _jsonable(x):
    """Config values as JSON types (tuples -> lists, numpy scalars -> Python, others -> str)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def soup_name(row: Mapping[str, Any]) -> str:
    """Folder name of a soup row: 'ratatouille_greedy_test0_trial1', 'soups_diwa_uniform_dagger_test2'."""
    method = row["method"].replace("†", "").replace("/", "_").replace(" ", "_").lower()
    selection = row["selection"].replace("†", "").lower()
    dagger = "_dagger" if "†" in row["method"] else ""
    trial = f"_trial{row['trial']}" if row["trial"] >= 0 else ""
    return f"{method}_{selection}{dagger}_test{row['test_env']}{trial}"


class SoupWriter:
    """Writes every soup the selection computes under `root/<soup_name(row)>/`: `model.safetensors`
    in the foundation's own key layout (torchvision for ResNets, efficientnet_pytorch for Lite0),
    `flax/` (an Orbax checkpoint, `load_flax_export`) and `card.json` (method, dataset identity,
    test env, trial, the averaged members with their inits, hparams and scores, the foundation's
    hash, the accuracy)."""

    def __init__(self, root: str | os.PathLike, *, arch: str, dataset, foundation_hash: str,
                 image_size: int):
        self.root = pathlib.Path(root)
        self.arch, self.dataset = arch, dataset
        self.foundation_hash, self.image_size = foundation_hash, image_size

    def __call__(self, row: Mapping[str, Any], params: Any, batch_stats: Any,
                 members: list[dict]) -> pathlib.Path:
        from rat_jax import distributed
        from rat_jax.files import write_json_atomic
        directory = self.root / soup_name(row)
        variables = {"params": params, "batch_stats": batch_stats}
        export_flax(directory / "flax", variables, {"arch": self.arch,
                                                    "image_size": self.image_size},
                    force=True)  # every process: Orbax coordinates multi-process saves
        if distributed.is_main_process():
            export_torch(directory / "model.safetensors", variables, self.arch,
                         format="safetensors")
            write_json_atomic(directory / "card.json", {
                "method": row["method"], "selection": row["selection"],
                "dataset": self.dataset.name, "dataset_identity": self.dataset.identity,
                "envs": list(self.dataset.envs), "test_env": row["test_env"],
                "trial": row["trial"], "accuracy": row["accuracy"],
                "accuracy_on": "the full test env (max_eval_images subset when set)",
                "arch": self.arch, "image_size": self.image_size,
                "num_classes": self.dataset.num_classes,
                "foundation_sha256": self.foundation_hash, "members": members,
                "files": {"safetensors": "model.safetensors", "orbax": "flax"}})
        return directory
