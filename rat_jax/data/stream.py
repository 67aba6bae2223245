"""Per-member training streams: what each step's batch holds, as a pure function of the step.

Every step, each member draws one batch of `batch_size` per training env, with replacement,
from that env's `in` split, and the per-env batches are concatenated in env order (DomainBed's
InfiniteDataLoader + RandomSampler(replacement=True)). Step s of member m depends only on
(seed_m, s): sample indices and augmentation come from numpy Generators seeded by
(seed_m, s, env) -- so the stream is deterministic, resumable from a step count, and can be
computed by any number of workers in any order.

`StreamSpec` holds the settings of a stream; `MemberStream` is the stream itself (the plan of a
step and the computation of each of its items from an ImageStore). Neither holds a store, a
thread or a process, so both pickle. The loader (loader.py) and its batch builders (batches.py)
decide where and when the items are computed.
"""
import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from rat_jax.data import transforms as T

AUGMENT_MODES = ("host", "device")
OUTPUTS = ("float32", "uint8")
# dtype of each augment parameter array of the device mode (int32 for the others)
_PARAM_DTYPES = {"flip": np.bool_, "grayscale": np.bool_, "brightness": np.float32,
                 "contrast": np.float32, "saturation": np.float32}


def device_canvas(size: int) -> int:
    """Default canvas side of the device mode: a little over `size` (PACS's 227-px images fit
    whole at 224), rounded up to a multiple of 8. Larger windows are resized on the host."""
    return -(-(size * 33 // 32 + 1) // 8) * 8


def _as_list(x, n, what):
    if isinstance(x, (int, np.integer)):
        return [int(x)] * n
    x = [int(v) for v in x]
    if len(x) != n:
        raise ValueError(f"{what} has {len(x)} entries for {n} members")
    return x


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """What a member's batch of one step holds (the members' seeds and envs aside).

    `batch_size` images per training env; `image_size` px; `augment=False` gives the eval
    transform (Resize) instead of the training one. `output="uint8"` skips normalization
    (normalize on device with augment.model_input). `cache_side`: None (default) cuts crops
    from the original images, as the reference; S caps the cached images' shorter side at S
    (faster; a second resampling for larger images).

    `augment_on="device"`: the host draws every random choice of the transform (the same draws
    as the host mode) and only cuts each crop window out of the cached image; the batch holds
    uint8 canvases [M, D*B, C, C, 3] (C = `canvas`, default device_canvas(image_size)) with the
    window at the top-left, plus `augment` = {name: [M, D*B, ...]} (augment.WINDOW_PARAMS) and
    `image_size`. The compiled step finishes the transform (resize, flip, colour jitter,
    grayscale, normalization: augment.model_input), so the images the network sees are those
    of the host mode. A window larger than the canvas is resized to image_size on the host
    (the same single resampling; the device's resize of it is then the identity).
    """
    batch_size: int = 32
    image_size: int = 224
    augment: bool = True
    holdout_fraction: float = 0.2
    output: str = "float32"
    augment_on: str = "host"
    canvas: Optional[int] = None
    cache_side: Optional[int] = None

    def __post_init__(self):
        if self.augment_on not in AUGMENT_MODES:
            raise ValueError(f"augment_on={self.augment_on!r}: use one of {AUGMENT_MODES}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output={self.output!r}: use 'float32' or 'uint8'")
        if self.canvas and self.canvas < self.image_size:
            raise ValueError(f"canvas={self.canvas} is smaller than image_size={self.image_size}")

    @property
    def device(self) -> bool:
        """Whether the batches are device-mode crop windows (augment_on="device" and augment)."""
        return self.augment and self.augment_on == "device"


class MemberStream:
    """The training stream of M members over `train_envs` (indices or names, in env order):
    `plan(step)` lists the step's items, `fill` / `fill_rows` compute items from an ImageStore.

    `seeds`: one stream seed per member (e.g. protocol.run_seed); `trial_seeds`: the split seed
    per member (an int for all). Pure and picklable: the same step gives the same items and
    pixels whenever and wherever it is computed."""

    def __init__(self, dataset, train_envs: Sequence, seeds: Sequence[int],
                 trial_seeds: Union[int, Sequence[int]] = 0,
                 spec: StreamSpec = StreamSpec()):
        if not len(seeds):
            raise ValueError("the loader needs at least one member seed")
        if any(int(s) < 0 for s in seeds):
            raise ValueError(f"member seeds must be >= 0, got {list(seeds)}")
        self.dataset, self.spec = dataset, spec
        self.train_envs = [dataset.env_index(e) for e in train_envs]
        if not self.train_envs:
            raise ValueError("train_envs is empty: pass the indices of the envs to train on")
        self.seeds = [int(s) for s in seeds]
        self.trial_seeds = _as_list(trial_seeds, len(self.seeds), "trial_seeds")
        self.canvas = int(spec.canvas or device_canvas(spec.image_size))
        self.cache_side = spec.cache_side or None  # None: crops cut from the original images
        splits = {t: dataset.splits(t, spec.holdout_fraction) for t in set(self.trial_seeds)}
        self.pools = [[splits[t][e][1] for e in self.train_envs] for t in self.trial_seeds]
        for e, pool in zip(self.train_envs, self.pools[0]):
            if len(pool) == 0:
                raise ValueError(f"env {dataset.envs[e]!r} has an empty in split; it cannot be "
                                 "trained on")

    @property
    def num_members(self) -> int:
        return len(self.seeds)

    @property
    def rows(self) -> int:
        """Images per member and step: D training envs x batch_size."""
        return len(self.train_envs) * self.spec.batch_size

    @property
    def side(self) -> int:
        """Side of each image of a batch: the canvas in device mode, else image_size."""
        return self.canvas if self.spec.device else self.spec.image_size

    def identity(self) -> dict:
        """What defines the stream (MemberLoader.get_state's fields besides the step)."""
        s = self.spec
        return {"seeds": list(self.seeds), "trial_seeds": list(self.trial_seeds),
                "train_envs": list(self.train_envs), "batch_size": s.batch_size,
                "image_size": s.image_size, "augment": s.augment,
                "dataset": self.dataset.identity}

    def param_fields(self, rows: int | None = None) -> list:
        """[(name, dtype, shape)] of the device mode's augment parameter arrays of a batch
        (of `rows` images per member; default a training step's)."""
        rows = self.rows if rows is None else rows
        return [(k, _PARAM_DTYPES.get(k, np.int32), (self.num_members, rows)
                 + (4,) * (k == "order")) for k in T.WINDOW_PARAMS]

    def plan(self, step: int) -> list:
        """[(member, slot, env, dataset index, sample seed)] of one step, fully determined."""
        out = []
        b_size = self.spec.batch_size
        for m, seed in enumerate(self.seeds):
            for d, (env, pool) in enumerate(zip(self.train_envs, self.pools[m])):
                rng = np.random.default_rng([seed, step, env])
                picks = pool[rng.integers(0, len(pool), b_size)]
                sample_seeds = rng.integers(0, 2**63 - 1, b_size)
                for b in range(b_size):
                    out.append((m, d * b_size + b, env, int(picks[b]), int(sample_seeds[b])))
        return out

    # -- one item -----------------------------------------------------------------------------
    def sample(self, store, env: int, idx: int, sample_seed: int) -> np.ndarray:
        """Host mode: the item's finished uint8 image [image_size, image_size, 3]."""
        size = self.spec.image_size
        if not self.spec.augment:
            return store.eval_array(env, idx, size)
        img = store.train_image(env, idx, self.cache_side)
        return T.train_transform_uint8(img, size, np.random.default_rng(sample_seed))

    def window(self, store, env: int, idx: int, sample_seed: int, out, params, where):
        """Device mode: draw the sample's parameters, cut its crop window into `out` (a zeroed
        canvas) and store the parameters at `where` in `params`."""
        src = store.train_array(env, idx, self.cache_side)
        h_img, w_img = src.shape[:2]
        p = T.window_params(np.random.default_rng(sample_seed), w_img, h_img)
        top, left, h, w = p["top"], p["left"], p["height"], p["width"]
        window = src[top:top + h, left:left + w]
        if h > self.canvas or w > self.canvas:
            size = self.spec.image_size
            window = np.asarray(Image.fromarray(np.ascontiguousarray(window)).resize(
                (size, size), Image.BILINEAR))
            h = w = size
        out[:h, :w] = window
        p["height"], p["width"] = h, w
        for k in T.WINDOW_PARAMS:
            params[k][where] = p[k]

    def fill(self, store, item, images, labels, params) -> None:
        """Write plan `item` into uint8 `images` [M, D*B, s, s, 3] (device mode: its window, on
        a zeroed canvas, and its parameters into `params`) and its label into `labels`."""
        m, slot, env, idx, sseed = item
        if self.spec.device:
            self._window_at(store, item, images[m, slot], params)
        else:
            images[m, slot] = self.sample(store, env, idx, sseed)
        labels[m, slot] = self.dataset.samples[env][idx][1]

    def fill_rows(self, store, items, arrays) -> None:
        """Write plan `items` into the arrays of a reused buffer (`images` float32 or uint8,
        `labels`, `augment.<name>` in device mode), exactly as `fill` into a fresh zeroed batch
        followed by normalize: float32 images are normalized per image (an elementwise map, so
        the same bits), device canvases are zeroed outside the window."""
        images, labels = arrays["images"], arrays["labels"]
        params = {k: arrays[f"augment.{k}"] for k in T.WINDOW_PARAMS} \
            if self.spec.device else None
        to_float = images.dtype == np.float32
        samples = self.dataset.samples
        for item in items:
            m, slot, env, idx, sseed = item
            if params is not None:
                out = images[m, slot]
                h, w = self._window_at(store, item, out, params)
                out[h:] = 0
                out[:h, w:] = 0
            elif to_float:
                images[m, slot] = T.normalize(self.sample(store, env, idx, sseed))
            else:
                images[m, slot] = self.sample(store, env, idx, sseed)
            labels[m, slot] = samples[env][idx][1]

    def _window_at(self, store, item, out, params) -> tuple:
        """`window` of plan `item` at its (member, slot); the (height, width) written."""
        m, slot, env, idx, sseed = item
        self.window(store, env, idx, sseed, out, params, (m, slot))
        return int(params["height"][m, slot]), int(params["width"][m, slot])
