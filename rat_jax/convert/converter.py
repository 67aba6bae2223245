"""Torch state dicts -> Flax variables for rat_jax.models, checked against the model's own shapes.

Key maps (torchvision and efficientnet_pytorch layouts):

* module path: each dotted part keeps its name without a leading '_', and a numeric part joins the
  part before it: ``layer1.0.downsample.0`` -> ``layer1_0/downsample_0``,
  ``_blocks.3._expand_conv`` -> ``blocks_3/expand_conv``; everything lives under ``featurizer``;
* leaves: 4-D ``weight`` -> ``kernel`` OIHW -> HWIO (depthwise ``(C,1,k,k)`` -> ``(k,k,1,C)``);
  1-D ``weight`` -> BN ``scale``; ``bias`` -> ``bias``; ``running_mean``/``running_var`` ->
  ``batch_stats`` ``mean``/``var``; ``num_batches_tracked`` dropped;
* head (``fc``, ``_fc``, DomainBed ``classifier`` or ``1``, canonicalized by the reader to
  ``classifier.*``): ``[out, in]`` -> ``params['classifier']['kernel'] [in, out]``, ``bias``.

The same rule serves every architecture in ``rat_jax.models.ARCHS`` because the Flax modules are
named after the torch keys; what differs per architecture is the expected tree, taken from
``create_model(arch, C).init`` through ``jax.eval_shape`` (no FLOPs, no memory). Every key must
match a leaf of that tree with the same shape, else a :class:`CheckpointFormatError` lists the
missing and unexpected keys and the first shape mismatch.

Floating tensors become float32 numpy arrays (the Flax models compute in float32).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Mapping

import numpy as np

from rat_jax.convert.reader import CheckpointFormatError, detect_format, read_torch_file

__all__ = ["convert_torch_checkpoint", "convert_state_dict", "torch_key_to_flax", "expected_shapes",
           "supported_archs"]

_BN_STATS = {"running_mean": "mean", "running_var": "var"}


def supported_archs() -> tuple[str, ...]:
    from rat_jax.models import ARCHS
    return tuple(ARCHS)


def _check_arch(arch: str) -> None:
    archs = supported_archs()
    if arch not in archs:
        raise ValueError(f"Unknown arch {arch!r}; valid archs: {', '.join(archs)}.")


@functools.lru_cache(maxsize=16)
def expected_shapes(arch: str, num_classes: int = 1) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{(collection, *path): shape}`` of ``create_model(arch, num_classes).init`` (abstractly)."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict
    from rat_jax.models import create_model

    _check_arch(arch)
    model = create_model(arch, num_classes, conv_impl="xla")
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))
    return {k: tuple(v.shape) for k, v in flatten_dict(abstract).items()}


def torch_key_to_flax(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """One canonical torch key and tensor -> ``((collection, *path), array)`` in Flax layout."""
    parts = key.split(".")
    leaf, mods = parts[-1], parts[:-1]
    path: list[str] = []
    for p in mods:
        if p.isdigit() and path:
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p.lstrip("_") or p)
    top = "classifier" if mods == ["classifier"] else None
    if top is None:
        path = ["featurizer"] + path
    v = np.asarray(value)
    if leaf in _BN_STATS:
        return ("batch_stats", *path, _BN_STATS[leaf]), v
    if leaf == "weight":
        if v.ndim == 4:
            return ("params", *path, "kernel"), v.transpose(2, 3, 1, 0)
        if v.ndim == 2:
            return ("params", *path, "kernel"), v.T
        if v.ndim == 1:
            return ("params", *path, "scale"), v
    if leaf == "bias":
        return ("params", *path, "bias"), v
    return ("params", *path, leaf), v  # not a known leaf: reported as unexpected


def _fmt(path: tuple[str, ...]) -> str:
    return "/".join(path)


def convert_state_dict(state_dict: Mapping[str, np.ndarray], arch: str, num_classes: int | None = None,
                       *, seed: int = 0) -> tuple[dict, dict]:
    """A canonical state dict (see ``read_torch_file``) -> (``{'params', 'batch_stats'}``, info).

    Head: a state dict with ``classifier.*`` gives ``params['classifier']`` (``num_classes``, if
    given, must equal its size). A featurizer-only state dict gives a tree without
    ``'classifier'`` when ``num_classes`` is None, else a freshly initialised head drawn as torch's
    ``nn.Linear`` default, weight and bias ~ U(+-1/sqrt(F)), from ``numpy.random.default_rng(seed)``.
    ``info``: arch, num_classes, classifier ('checkpoint' | 'fresh_torch_init' | 'none'), num_keys.
    """
    _check_arch(arch)
    converted: dict[tuple[str, ...], np.ndarray] = {}
    origin: dict[tuple[str, ...], str] = {}
    for k, v in state_dict.items():
        path, arr = torch_key_to_flax(k, v)
        if arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16" or arr.dtype.kind == "V":
            arr = arr.astype(np.float32)
        converted[path] = np.ascontiguousarray(arr)
        origin[path] = k
    has_head = any(p[:2] == ("params", "classifier") for p in converted)
    file_classes = None
    if has_head:
        w = converted.get(("params", "classifier", "kernel"))
        if w is not None and w.ndim == 2:
            file_classes = int(w.shape[1])
        if num_classes is not None and file_classes is not None and num_classes != file_classes:
            raise CheckpointFormatError(
                f"--num-classes {num_classes} does not match the checkpoint's classifier "
                f"({file_classes} classes); leave it unset to keep the checkpoint's head.")
    ref_classes = file_classes or num_classes or 1
    expected = expected_shapes(arch, ref_classes)
    want = {p: s for p, s in expected.items() if p[:2] != ("params", "classifier") or has_head}

    missing = sorted((p for p in want if p not in converted), key=lambda p: p[0] != "params")
    unexpected = [p for p in converted if p not in want]
    mismatch = next(((p, converted[p].shape, want[p]) for p in converted
                     if p in want and tuple(converted[p].shape) != tuple(want[p])), None)
    if missing or unexpected or mismatch:
        msg = [f"checkpoint does not match arch {arch!r} "
               f"({len(state_dict)} tensors in the file, {len(want)} expected):"]
        if missing:
            msg.append(f"{len(missing)} missing keys, e.g. " + ", ".join(_fmt(p) for p in missing[:5]))
        if unexpected:
            msg.append(f"{len(unexpected)} unexpected keys, e.g. "
                       + ", ".join(f"{origin[p]} (-> {_fmt(p)})" for p in unexpected[:5]))
        if mismatch:
            p, got, exp = mismatch
            msg.append(f"first shape mismatch: {origin[p]} -> {_fmt(p)} has shape {tuple(got)} in Flax "
                       f"layout, the model expects {tuple(exp)}")
        guess = _guess_arch(converted, arch)
        if guess:
            msg.append(f"the tensors match arch {guess!r}; pass --arch {guess}")
        raise CheckpointFormatError("\n  ".join(msg))

    head = "checkpoint" if has_head else "none"
    if not has_head and num_classes is not None:
        feat_dim = expected[("params", "classifier", "kernel")][0]
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(feat_dim)
        converted[("params", "classifier", "kernel")] = rng.uniform(
            -bound, bound, (feat_dim, num_classes)).astype(np.float32)
        converted[("params", "classifier", "bias")] = rng.uniform(
            -bound, bound, (num_classes,)).astype(np.float32)
        head = "fresh_torch_init"

    from flax.traverse_util import unflatten_dict
    tree = unflatten_dict(converted)
    tree.setdefault("batch_stats", {})
    info = {"arch": arch, "num_classes": file_classes or num_classes, "classifier": head,
            "num_keys": len(state_dict), "seed": seed if head == "fresh_torch_init" else None}
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, info


def _guess_arch(converted: Mapping[tuple[str, ...], np.ndarray], tried: str) -> str | None:
    feat = {p: tuple(v.shape) for p, v in converted.items() if p[:2] != ("params", "classifier")}
    for arch in supported_archs():
        if arch == tried:
            continue
        try:
            exp = {p: s for p, s in expected_shapes(arch, 1).items() if p[:2] != ("params", "classifier")}
        except Exception:  # pragma: no cover - a broken model must not hide the real error
            continue
        if exp == feat:
            return arch
    return None


def convert_torch_checkpoint(path: str | os.PathLike, arch: str, num_classes: int | None = None,
                             *, seed: int = 0) -> dict[str, Any]:
    """Read a torch/safetensors checkpoint (no torch needed) -> ``{'params', 'batch_stats'}``.

    Accepts torchvision/efficientnet_pytorch state dicts and DomainBed's ``model_best.pkl``,
    ``network_best.pkl`` and ``featurizer_last.pkl``. For a featurizer-only file the tree has no
    ``'classifier'`` unless ``num_classes`` is given, in which case the head is freshly
    initialised torch-style (see :func:`convert_state_dict`).
    """
    _check_arch(arch)
    variables, _ = convert_state_dict(read_torch_file(path), arch, num_classes, seed=seed)
    return variables


def convert_file_with_info(path: str | os.PathLike, arch: str, num_classes: int | None = None,
                           *, seed: int = 0) -> tuple[dict, dict]:
    """:func:`convert_torch_checkpoint` plus the info dict (with ``source_format``)."""
    _check_arch(arch)
    fmt = detect_format(path)
    variables, info = convert_state_dict(read_torch_file(path), arch, num_classes, seed=seed)
    info["source_format"] = fmt
    return variables, info
