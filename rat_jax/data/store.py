"""Decoded-image store with an on-disk uint8 cache, so a second run decodes no JPEG.

Per dataset identity the cache keeps, per env:
- train_s0: every image as RGB uint8 at its original resolution (the default, side=None), so a
  training crop is cut from the original and resampled once, as in the reference. If the
  decoded env would not fit the cache disk (estimated from a sample of image headers, against
  half the free space), the env is not cached and its images are decoded from their files for
  every crop (still exact, slower; one warning says so, and how to cap the side instead).
- train_s{S} (side=S, opt-in): the images downscaled (aspect kept) so the shorter side is at
  most S; smaller images stay as they are. A crop of a downscaled image is resampled twice
  (an approximation, faster and smaller); exact for datasets whose images are all <= S.
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
import shutil
import threading
import warnings
from typing import Optional

import numpy as np
from PIL import Image

from rat_jax.data import transforms as T
from rat_jax.files import temp_path
from rat_jax.runtime import usable_cores

CACHE_ENV_VAR = "RAT_JAX_CACHE"
# `cache_dir=DEFAULT_CACHE`: use the default cache dir (default_cache_dir()); a sentinel, because
# cache_dir=None means "no disk cache".
DEFAULT_CACHE = object()


def default_cache_dir() -> str:
    """$RAT_JAX_CACHE, else ~/.cache/rat_jax."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "rat_jax")


def default_workers() -> int:
    """Decode threads: one per usable core, at most 8."""
    return max(1, min(8, usable_cores()))


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
        self._fits = {}    # (env, side) -> whether train_s{side} is cached on disk
        self._lock = threading.Lock()

    def __getstate__(self):
        """Pickled (a loader's worker process gets a copy): the dataset, the cache dir and the
        cache decisions taken here, so the copy reads the same cache files without deciding (or
        warning) again; it maps them afresh."""
        return {"dataset": self.dataset, "cache_dir": self.cache_dir, "workers": self.workers,
                "fits": dict(self._fits)}

    def __setstate__(self, state: dict):
        self.__init__(state["dataset"], state["cache_dir"], state["workers"])
        self._fits.update(state["fits"])

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
        if (self.cache_dir is None or getattr(self.dataset, "arrays", None) is not None
                or not self.train_cacheable(env, side)):
            return np.asarray(cap_shorter_side(self.original(env, idx), side))
        flat, index = self._train_env(env, side)
        off, h, w = index[idx]
        return flat[off:off + h * w * 3].reshape(h, w, 3)

    def eval_array(self, env: int, idx: int, size: int) -> np.ndarray:
        """Resize((size, size)) of the original, uint8 [size, size, 3]."""
        if self.cache_dir is None:
            return T.eval_transform_uint8(self.original(env, idx), size)
        return self._eval_env(env, size)[idx]

    def train_cacheable(self, env: int, side: Optional[int]) -> bool:
        """Whether env's training images go to the disk cache: always for a capped side; for
        originals when their estimated decoded size fits half the cache disk's free space."""
        return self._once(self._fits, (env, side), self._decide_fits)

    def _decide_fits(self, env: int, side: Optional[int]) -> bool:
        d, data_path, _ = self._paths(f"train_s{side or 0}", env)
        if side is not None or os.path.exists(data_path):
            return True
        need = self.estimate_train_bytes(env)
        os.makedirs(self.cache_dir, exist_ok=True)
        free = shutil.disk_usage(self.cache_dir).free
        if need <= free // 2:
            return True
        warnings.warn(
            f"{self.dataset.name} env {env}: its decoded originals (~{need / 2**30:.1f} GiB) do "
            f"not fit half the free space of the cache disk ({free / 2**30:.1f} GiB free in "
            f"{self.cache_dir}); training crops decode the image files instead (exact, slower). "
            "Free space, point cache_dir at a larger disk, or cap the cached side "
            "(config.train_cache_side, e.g. 280 for 224-px training: faster, approximate).",
            stacklevel=2)
        return False

    def estimate_train_bytes(self, env: int, sample: int = 256) -> int:
        """Decoded RGB bytes of env's originals, from the headers of up to `sample` files."""
        paths = [p for p, _ in self.dataset.samples[env]]
        if not paths:
            return 0
        pick = np.random.default_rng(0).choice(len(paths), min(sample, len(paths)), replace=False)
        sizes = []
        for i in pick:
            try:
                with Image.open(paths[i]) as im:  # reads the header only
                    sizes.append(im.size[0] * im.size[1] * 3)
            except (OSError, SyntaxError, ValueError):  # unreadable: decoding it names the file
                continue
        return int(np.mean(sizes) * len(paths)) if sizes else 0

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
            tmp = temp_path(data_path)
            with open(tmp, "wb") as f, concurrent.futures.ThreadPoolExecutor(self.workers) as ex:
                capped = lambda i: np.asarray(cap_shorter_side(self.original(env, i), side))
                offset = 0
                for i, im in enumerate(ex.map(capped, range(n))):  # ordered, streamed to disk
                    index[i] = (offset, im.shape[0], im.shape[1])
                    f.write(np.ascontiguousarray(im, np.uint8).tobytes())
                    offset += im.size
            tmp_idx = temp_path(index_path, ".tmp.npy")
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
            tmp = temp_path(path, ".tmp.npy")
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

    def warm(self, envs=None, train_side: Optional[int] = None, eval_size: Optional[int] = None,
             train: bool | None = None):
        """Build the cache for these envs now (otherwise it is built on first use): the training
        images (at `train_side`, None = originals) unless train=False (default: when
        train_side is given or eval_size is not), and the eval images at `eval_size`."""
        if self.cache_dir is None:
            return
        if train is None:
            train = train_side is not None or eval_size is None
        for env in range(self.dataset.num_envs) if envs is None else envs:
            if train and self.train_cacheable(env, train_side):
                self._train_env(env, train_side)
            if eval_size is not None:
                self._eval_env(env, eval_size)


def train_side_for(size: int) -> int:
    """A cached shorter side for a train size that keeps most of a crop's pixels:
    ceil(1.25 * size) (an opt-in cap; the default cache keeps the originals)."""
    return int(math.ceil(1.25 * size))
