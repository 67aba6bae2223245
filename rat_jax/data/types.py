"""Dataset types shared by every source: a multi-domain image dataset as per-env file lists."""
import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from rat_jax.data.protocol import split_indices

# torchvision's IMG_EXTENSIONS (matched case-insensitively, like ImageFolder)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(ValueError):
    """A dataset folder or name that cannot be used as given (the message says how to fix it)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One row of DomainBed's dataset table (`rat_jax.data.SPECS`)."""
    name: str            # DomainBed class name, e.g. "PACS"
    dirname: str         # folder under the data root, e.g. "office_home"
    envs: Tuple[str, ...]  # expected env folder names, sorted
    n_steps: int = 5001
    checkpoint_freq: int = 100


@dataclasses.dataclass
class DomainDataset:
    """A multi-domain image classification dataset as lists of (path, label) per env."""
    name: str
    root: str
    envs: List[str]
    classes: List[str]
    samples: List[List[Tuple[str, int]]]  # per env, ImageFolder order
    identity: str = ""
    n_steps: int = 5001
    checkpoint_freq: int = 100
    excluded: int = 0                      # files dropped by DomainNet duplicate exclusion
    skipped: List[str] = dataclasses.field(default_factory=list)  # unreadable files skipped
    arrays: Optional[List[np.ndarray]] = None  # in-memory uint8 [N,H,W,3] per env (array sources)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def env_sizes(self) -> List[int]:
        return [len(s) for s in self.samples]

    def labels(self, env: int) -> np.ndarray:
        return np.asarray([y for _, y in self.samples[env]], dtype=np.int32)

    def splits(self, trial_seed: int, holdout_fraction: float = 0.2):
        """Per env (out_idx, in_idx), DomainBed `split_dataset` with seed_hash(trial_seed, env_i)."""
        return [split_indices(len(s), trial_seed, i, holdout_fraction)
                for i, s in enumerate(self.samples)]

    def env_index(self, env) -> int:
        """Index of env given as int or name."""
        if isinstance(env, (int, np.integer)):
            if not -len(self.envs) <= env < len(self.envs):
                raise DatasetError(f"env index {env} out of range for {self.name} envs {self.envs}")
            return int(env) % len(self.envs)
        if env not in self.envs:
            raise DatasetError(f"unknown env {env!r} for {self.name}; envs are {self.envs}")
        return self.envs.index(env)
