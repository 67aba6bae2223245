"""Data: dataset sources, exact protocol seeds/splits/hparams, transforms, member loaders.

`load_dataset` turns a name or path into a `DomainDataset` (sources.py); DATA.md describes
every module.
"""
from rat_jax.data.protocol import (HPARAM_SPACE, aux_init_assignment, default_hparams,
                                   random_hparams, run_seed, seed_hash, split_indices)
from rat_jax.data.types import IMG_EXTENSIONS, DatasetError, DatasetSpec, DomainDataset
from rat_jax.data.domainbed import SPECS, load_folder
from rat_jax.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError,
                                     eval_transform_uint8, normalize, train_transform_uint8)
from rat_jax.data.store import DEFAULT_CACHE, ImageStore, default_cache_dir
from rat_jax.data.stream import MemberStream, StreamSpec
from rat_jax.data.loader import FeedOptions, MemberLoader, eval_indices
from rat_jax.data.demo import build_demo_datasets
from rat_jax.data.sources import load_dataset

__all__ = [
    "HPARAM_SPACE", "aux_init_assignment", "default_hparams", "random_hparams", "run_seed",
    "seed_hash", "split_indices", "IMG_EXTENSIONS", "SPECS", "DatasetError", "DatasetSpec",
    "DomainDataset", "load_dataset", "load_folder", "IMAGENET_MEAN",
    "IMAGENET_STD", "ImageDecodeError", "eval_transform_uint8", "normalize",
    "train_transform_uint8", "DEFAULT_CACHE", "ImageStore", "default_cache_dir", "MemberLoader",
    "MemberStream", "StreamSpec", "FeedOptions", "eval_indices",
    "build_demo_datasets",
]
