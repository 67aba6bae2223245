"""Data: DomainBed sources, exact protocol seeds/splits/hparams, transforms, member loaders."""
from rat_jax.data.protocol import (HPARAM_SPACE, aux_init_assignment, default_hparams,
                                   random_hparams, run_seed, seed_hash, split_indices)
from rat_jax.data.domainbed import (IMG_EXTENSIONS, SPECS, DatasetError, DomainDataset,
                                    load_domainbed, load_folder)
from rat_jax.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, ImageDecodeError,
                                     eval_transform_uint8, normalize, train_transform_uint8)
from rat_jax.data.store import ImageStore, default_cache_dir
from rat_jax.data.loader import MemberLoader, eval_indices, iterate_eval
from rat_jax.data.demo import build_demo_datasets

__all__ = [
    "HPARAM_SPACE", "aux_init_assignment", "default_hparams", "random_hparams", "run_seed",
    "seed_hash", "split_indices", "IMG_EXTENSIONS", "SPECS", "DatasetError", "DomainDataset",
    "load_domainbed", "load_folder", "IMAGENET_MEAN", "IMAGENET_STD", "ImageDecodeError",
    "eval_transform_uint8", "normalize", "train_transform_uint8", "ImageStore",
    "default_cache_dir", "MemberLoader", "eval_indices", "iterate_eval", "build_demo_datasets",
]
