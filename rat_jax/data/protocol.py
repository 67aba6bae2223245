"""DomainBed / Model Ratatouille protocol functions, bit-exact with the reference code.

`seed_hash` and the split come from `domainbed/lib/misc.py`, the hparams from
`domainbed/hparams_registry.py`, the aux-init rule from `misc.get_featurizer_aux` (MR).
"""
import hashlib
from typing import Sequence, Union

import numpy as np

# (name, default for h=0, random choices) in registry order; every random value is a
# fresh RandomState(seed_hash(seed_hash(h, t), name)).choice(choices), like `_hparam`.
HPARAM_SPACE = (
    ("data_augmentation", True, None),
    ("resnet_dropout", 0.0, [0.0, 0.1, 0.5]),
    ("lr", 5e-5, [1e-5, 3e-5, 5e-5]),
    ("weight_decay", 0.0, [1e-4, 1e-6]),
    ("batch_size", 32, None),
    ("lp_steps", 200, [200]),
)


def seed_hash(*args) -> int:
    """md5 of the Python repr of the args tuple, mod 2**31 (DomainBed `misc.seed_hash`)."""
    return int(hashlib.md5(str(args).encode("utf-8")).hexdigest(), 16) % (2**31)


def split_indices(n: int, trial_seed: int, env_index: int, holdout_fraction: float = 0.2):
    """(out_idx, in_idx) of DomainBed `split_dataset(env, int(n*hf), seed_hash(trial_seed, env_i))`."""
    keys = list(range(n))
    np.random.RandomState(seed_hash(trial_seed, env_index)).shuffle(keys)
    n_out = int(n * holdout_fraction)
    keys = np.asarray(keys, dtype=np.int64)
    return keys[:n_out], keys[n_out:]


def default_hparams() -> dict:
    """The h=0 hparams: lr 5e-5, weight_decay 0, resnet_dropout 0, batch 32 per domain."""
    return {name: default for name, default, _ in HPARAM_SPACE}


def random_hparams(hparams_seed: int, trial_seed: int) -> dict:
    """Hparams of run (h, t): defaults for h=0, else MR's registry draw with seed_hash(h, t)."""
    if hparams_seed == 0:
        return default_hparams()
    base = seed_hash(hparams_seed, trial_seed)
    out = {}
    for name, default, choices in HPARAM_SPACE:
        random_state = np.random.RandomState(seed_hash(base, name))
        out[name] = default if choices is None else random_state.choice(choices).item()
    out["lp_steps"] = int(out["lp_steps"])
    return out


def run_seed(dataset: str, test_env: int, hparams_seed: int, trial_seed: int,
             algorithm: str = "ERM") -> int:
    """Per-run seed of sweep.py: seed_hash(dataset, 'ERM', [test_env], h, t) (test_env -1 = none)."""
    return seed_hash(dataset, algorithm, [test_env], hparams_seed, trial_seed)


def aux_init_assignment(h: int, aux_folders: Sequence[str], n_runs: int,
                        target: str = None) -> Union[str, tuple]:
    """Init of target run h (MR `get_featurizer_aux`, docs/protocol.md §1.3).

    Folders are sorted (and, with `target`, those whose name starts with it dropped);
    i = h % (len+1): 0 -> "imagenet", else (folders[i-1], h % n_runs): the run index in
    that folder's sorted list of finished runs.
    """
    folders = sorted(f for f in aux_folders if target is None or not str(f).startswith(target))
    if n_runs < 1 and folders:
        raise ValueError(f"n_runs={n_runs}: each aux folder needs >= 1 finished run")
    i = h % (len(folders) + 1)
    if i == 0:
        return "imagenet"
    return folders[i - 1], h % n_runs
