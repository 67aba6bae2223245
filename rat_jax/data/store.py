"""Decoded-image store with an on-disk uint8 cache, so a second run decodes no JPEG.

Per dataset identity the cache keeps, per env:
- train_s{S}: every image as RGB uint8, downscaled (aspect kept) so its shorter side is at
  most S (default ceil(1.25 * train size)); smaller images stay as they are. RandomResizedCrop
  then runs on this image instead of the original: exact when nothing was downscaled (PACS at
  224: 227 px originals), otherwise a small extra resampling step (documented approximation).
- eval_{size}: [N, size, size, 3] uint8 of Resize((size, size)) from the original: exact.
Files are written to a temp name and renamed, so an interrupted build leaves no partial cache.

Environment: $RAT_JAX_CACHE sets the default cache dir (else ~/.cache/rat_jax); it holds the
decoded images and the built demo datasets.
"""
import concurrent.futures
import hashlib
import json
import math
import os
import threading
from typing import Optional

import numpy as np
from PIL import Image

from rat_jax.data import transforms as T

CACHE_ENV_VAR = "RAT_JAX_CACHE"
# `cache_dir=DEFAULT_CACHE`: use the default cache dir (default_cache_dir()); a sentinel, because
# cache_dir=None means "no disk cache".
DEFAULT_CACHE = object()


def default_cache_dir() -> str:
    """$RAT_JAX_CACHE, else ~/.cache/rat_jax."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "rat_jax")


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def cap_shorter_side(img: Image.Image, side: Optional[int]) -> Image.Image:
    """Downscale (bilinear, aspect kept) so the shorter side is <= side; never upscale."""
    w, h = img.size
    if side is None or min(w, h) <= side:
        return img
    size = (side, max(side, round(h * side / w))) if w <= h else (max(side, round(w * side / h)), side)
    return img.resize(size, Image.BILINEAR)


class ImageStore:
    """Images of one DomainDataset: decoded from files (or arrays), cached as uint8 on disk.

    cache_dir=DEFAULT_CACHE uses default_cache_dir(); None disables the disk cache (every access
    decodes the file: the "cold" path).
    """

    def __init__(self, dataset, cache_dir=DEFAULT_CACHE, workers: Optional[int] = None):
        self.dataset = dataset
        self.cache_dir = default_cache_dir() if cache_dir is DEFAULT_CACHE else cache_dir
        self.workers = workers or default_workers()
        self._train = {}   # (env, side) -> (flat memmap, index [N, 3])
        self._eval = {}    # (env, size) -> [N, size, size, 3]
        self._lock = threading.Lock()

    # -- raw access -----------------------------------------------------------------------
    def original(self, env: int, idx: int) -> Image.Image:
        """The full-resolution RGB image (decodes the file; no cache)."""
        arrays = getattr(self.dataset, "arrays", None)
        if arrays is not None:
            return Image.fromarray(np.asarray(arrays[env][idx]))
        return T.decode(self.dataset.samples[env][idx][0])

    def train_image(self, env: int, idx: int, side: Optional[int]) -> Image.Image:
        """Image for training crops: cached capped copy, or decoded (and capped) on the fly."""
        return Image.fromarray(np.asarray(self.train_array(env, idx, side)))

    def train_array(self, env: int, idx: int, side: Optional[int]) -> np.ndarray:
        """`train_image` as uint8 [H, W, 3] (a read-only view of the cache when there is one)."""
        if self.cache_dir is None or getattr(self.dataset, "arrays", None) is not None:
            return np.asarray(cap_shorter_side(self.original(env, idx), side))
        flat, index = self._train_env(env, side)
        off, h, w = index[idx]
        return flat[off:off + h * w * 3].reshape(h, w, 3)

    def eval_array(self, env: int, idx: int, size: int) -> np.ndarray:
        """Resize((size, size)) of the original, uint8 [size, size, 3]."""
        if self.cache_dir is None:
            return T.eval_transform_uint8(self.original(env, idx), size)
        return self._eval_env(env, size)[idx]

    # -- cache ----------------------------------------------------------------------------
    def env_dir(self) -> str:
        ident = self.dataset.identity or self.dataset.name
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.dataset.name)
        return os.path.join(self.cache_dir, "images",
                            f"{safe}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}")

    def _train_env(self, env: int, side: Optional[int]):
        return self._once(self._train, (env, side), self._load_or_build_train)

    def _eval_env(self, env: int, size: int):
        return self._once(self._eval, (env, size), self._load_or_build_eval)

    def _once(self, table: dict, key: tuple, build):
        """table[key], built by build(*key) by the first thread that asks (double-checked lock)."""
        if key not in table:
            with self._lock:
                if key not in table:
                    table[key] = build(*key)
        return table[key]

    def _paths(self, kind: str, env: int):
        d = os.path.join(self.env_dir(), kind)
        return d, os.path.join(d, f"env{env}.u8"), os.path.join(d, f"env{env}.index.npy")

    def _load_or_build_train(self, env, side):
        d, data_path, index_path = self._paths(f"train_s{side or 0}", env)
        if not (os.path.exists(data_path) and os.path.exists(index_path)):
            os.makedirs(d, exist_ok=True)
            self._write_meta()
            n = len(self.dataset.samples[env])
            index = np.zeros((n, 3), np.int64)
            tmp = f"{data_path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f, concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
                capped = lambda i: np.asarray(cap_shorter_side(self.original(env, i), side))
                offset = 0
                for i, im in enumerate(ex.map(capped, range(n))):  # ordered, streamed to disk
                    index[i] = (offset, im.shape[0], im.shape[1])
                    f.write(np.ascontiguousarray(im, np.uint8).tobytes())
                    offset += im.size
            tmp_idx = f"{index_path}.{os.getpid()}.tmp.npy"
            np.save(tmp_idx, index)
            os.replace(tmp, data_path)
            os.replace(tmp_idx, index_path)
        index = np.load(index_path)
        if len(index) != len(self.dataset.samples[env]):
            raise RuntimeError(f"cache {index_path!r} holds {len(index)} images, dataset env "
                               f"{env} has {len(self.dataset.samples[env])}; delete the cache dir")
        size = os.path.getsize(data_path)
        flat = np.memmap(data_path, np.uint8, "r") if size else np.zeros(0, np.uint8)
        return flat, index

    def _load_or_build_eval(self, env, size):
        d, _, _ = self._paths(f"eval_{size}", env)
        path = os.path.join(d, f"env{env}.npy")
        if not os.path.exists(path):
            os.makedirs(d, exist_ok=True)
            self._write_meta()
            n = len(self.dataset.samples[env])
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            out = np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, size, size, 3))

            def fill(i):
                out[i] = T.eval_transform_uint8(self.original(env, i), size)
            with concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
                list(ex.map(fill, range(n)))
            out.flush()
            del out
            os.replace(tmp, path)
        arr = np.load(path, mmap_mode="r")
        if len(arr) != len(self.dataset.samples[env]):
            raise RuntimeError(f"cache {path!r} holds {len(arr)} images; delete the cache dir")
        return arr

    def _write_meta(self):
        meta = os.path.join(self.env_dir(), "dataset.json")
        if not os.path.exists(meta):
            os.makedirs(self.env_dir(), exist_ok=True)
            with open(meta, "w") as f:
                json.dump({"name": self.dataset.name, "identity": self.dataset.identity,
                           "root": self.dataset.root, "envs": self.dataset.envs,
                           "sizes": self.dataset.env_sizes()}, f, indent=1)

    def warm(self, envs=None, train_side: Optional[int] = None, eval_size: Optional[int] = None):
        """Build the cache for these envs now (otherwise it is built on first use)."""
        if self.cache_dir is None:
            return
        for env in range(self.dataset.num_envs) if envs is None else envs:
            if train_side is not None or eval_size is None:
                self._train_env(env, train_side)
            if eval_size is not None:
                self._eval_env(env, eval_size)


def train_side_for(size: int) -> int:
    """Default cached shorter side for a train size: ceil(1.25 * size)."""
    return int(math.ceil(1.25 * size))
