"""DomainBed file-list sources: `root/<domain>/<class>/<image>` in torchvision ImageFolder order.

Env order = sorted sub-directory names (DomainBed `os.scandir` + `sorted`); inside an env,
classes = sorted folder names and files = sorted `os.walk` then sorted names, filtered by
IMG_EXTENSIONS (torchvision `make_dataset`). Split seeds select by index, so this order matters.
"""
import dataclasses
import gzip
import hashlib
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from rat_jax.data.protocol import split_indices

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str            # DomainBed class name, e.g. "PACS"
    dirname: str         # folder under the data root, e.g. "office_home"
    envs: Tuple[str, ...]  # expected env folder names, sorted
    n_steps: int = 5001
    checkpoint_freq: int = 100


# Env folder names as DomainBed's download.py leaves them; CHECKPOINT_FREQ per PROTOCOL §3.1.
SPECS = {
    "VLCS": DatasetSpec("VLCS", "VLCS", ("Caltech101", "LabelMe", "SUN09", "VOC2007"), 5001, 50),
    "PACS": DatasetSpec("PACS", "PACS", ("art_painting", "cartoon", "photo", "sketch")),
    "OfficeHome": DatasetSpec("OfficeHome", "office_home", ("Art", "Clipart", "Product", "Real World")),
    "TerraIncognita": DatasetSpec("TerraIncognita", "terra_incognita",
                                  ("location_100", "location_38", "location_43", "location_46")),
    "DomainNet": DatasetSpec("DomainNet", "domain_net",
                             ("clipart", "infograph", "painting", "quickdraw", "real", "sketch"),
                             15001, 500),
}
_ALIASES = {k.lower(): k for k in SPECS}
_ALIASES.update({s.dirname.lower(): s.name for s in SPECS.values()})
DUPLICATES_ENV_VAR = "RAT_JAX_DOMAINNET_DUPLICATES"
# A few entries of DomainBed's domainbed/misc/domain_net_duplicates.txt (9,431 lines; the full
# list is not shipped here). If one of them exists, the folder was not cleaned by DomainBed's
# downloader, and loading needs the full list to match the reference file list.
DOMAINNET_DUPLICATE_SENTINELS = (
    "clipart/animal_migration/clipart_006_000227.jpg", "clipart/baseball_bat/clipart_018_000011.jpg",
    "clipart/bird/clipart_032_000255.jpg", "clipart/book/clipart_036_000137.jpg",
    "clipart/bowtie/clipart_039_000059.jpg", "clipart/cake/clipart_052_000004.jpg",
    "clipart/couch/clipart_081_000001.jpg", "clipart/couch/clipart_081_000232.jpg",
    "clipart/cup/clipart_088_000001.jpg", "clipart/goatee/clipart_131_000002.jpg",
    "clipart/hamburger/clipart_136_000079.jpg", "painting/stairs/painting_283_000003.jpg",
    "painting/star/painting_284_000013.jpg", "painting/steak/painting_285_000010.jpg",
    "painting/strawberry/painting_291_000073.jpg", "painting/squirrel/painting_282_000779.jpg",
)


class DatasetError(ValueError):
    """A dataset folder or name that cannot be used as given (the message says how to fix it)."""


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


def list_envs(root: str) -> List[str]:
    """Sorted sub-directory names of a dataset root (DomainBed env order)."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root!r} does not exist or is not a directory; "
                           "pass the folder holding one sub-folder per domain")
    envs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not envs:
        raise DatasetError(f"dataset root {root!r} has no domain sub-folders; expected "
                           "root/<domain>/<class>/<image>")
    return envs


def image_folder(env_dir: str) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(classes, samples) exactly as torchvision ImageFolder lists them."""
    classes = sorted(e.name for e in os.scandir(env_dir) if e.is_dir())
    if not classes:
        raise DatasetError(f"domain folder {env_dir!r} has no class sub-folders; expected "
                           "<domain>/<class>/<image>")
    samples, empty = [], []
    for label, cls in enumerate(classes):
        n0 = len(samples)
        for root, _, fnames in sorted(os.walk(os.path.join(env_dir, cls), followlinks=True)):
            for fname in sorted(fnames):
                if fname.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(root, fname), label))
        if len(samples) == n0:
            empty.append(cls)
    if empty:
        raise DatasetError(f"class folder(s) {empty} in {env_dir!r} hold no image file "
                           f"(extensions {IMG_EXTENSIONS}); add images or remove the folder "
                           "from every domain")
    return classes, samples


def _identity(name: str, root: str, envs, classes, samples) -> str:
    """Stable id: dataset name + sha256 of relative paths, labels and file sizes."""
    h = hashlib.sha256(repr((envs, classes)).encode())
    for env_samples in samples:
        for path, label in env_samples:
            h.update(f"{os.path.relpath(path, root)}\0{label}\0{os.path.getsize(path)}\n".encode())
    return f"{name}:{h.hexdigest()[:20]}"


def domain_net_duplicates(path=None) -> Optional[set]:
    """Relative paths DomainBed's downloader deletes, read from DomainBed's
    `domainbed/misc/domain_net_duplicates.txt` (given path or $RAT_JAX_DOMAINNET_DUPLICATES);
    None when no list is available."""
    path = path or os.environ.get(DUPLICATES_ENV_VAR)
    if not path:
        return None
    if not os.path.isfile(path):
        raise DatasetError(f"DomainNet duplicate list {path!r} not found; pass the path of "
                           "DomainBed's domainbed/misc/domain_net_duplicates.txt")
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return {line.strip() for line in f if line.strip()}


def _check_domain_net_cleaned(path):
    """Without the duplicate list, refuse a folder that still holds DomainBed's duplicates."""
    found = [p for p in DOMAINNET_DUPLICATE_SENTINELS if os.path.exists(os.path.join(path, p))]
    if found:
        raise DatasetError(
            f"DomainNet at {path!r} still contains files that DomainBed's downloader deletes "
            f"(e.g. {found[0]!r}); pass duplicates_file=<DomainBed's "
            f"domainbed/misc/domain_net_duplicates.txt> (or set ${DUPLICATES_ENV_VAR}), delete "
            "them with DomainBed's download.py, or pass exclude_duplicates=False to keep them")


def _drop_unreadable(samples, workers=4):
    """(kept, bad paths): decode every file once; used only with on_bad_image='skip'."""
    import concurrent.futures
    from rat_jax.data.transforms import ImageDecodeError, decode

    def ok(item):
        try:
            decode(item[0])
            return True
        except ImageDecodeError:
            return False
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        flags = list(ex.map(ok, samples))
    return ([s for s, f in zip(samples, flags) if f], [s[0] for s, f in zip(samples, flags) if not f])


def load_folder(root, name: Optional[str] = None, expected_envs: Optional[Sequence[str]] = None,
                exclude: Optional[set] = None, n_steps: int = 5001,
                checkpoint_freq: int = 100, on_bad_image: str = "raise") -> DomainDataset:
    """Any `root/<domain>/<class>/<image>` folder as a DomainDataset (generic source).

    on_bad_image="raise": an unreadable file raises ImageDecodeError (naming it) when decoded;
    "skip": every file is decoded now and unreadable ones are dropped and listed in `.skipped`
    (this changes the indices, hence the splits, relative to the reference).
    """
    if on_bad_image not in ("raise", "skip"):
        raise DatasetError(f"on_bad_image={on_bad_image!r}: use 'raise' or 'skip'")
    root = os.path.abspath(os.fspath(root))
    envs = list_envs(root)
    name = name or os.path.basename(root.rstrip(os.sep))
    if expected_envs is not None and envs != list(expected_envs):
        missing = sorted(set(expected_envs) - set(envs))
        extra = sorted(set(envs) - set(expected_envs))
        raise DatasetError(
            f"{name} at {root!r}: domain folders {envs} differ from DomainBed's "
            f"{list(expected_envs)} (missing {missing}, unexpected {extra}); env order sets the "
            "test_env index, so restore the missing domains / move the extra folders out, or load "
            "the folder as a generic dataset by path")
    classes, samples, excluded, skipped = None, [], 0, []
    for env in envs:
        env_classes, env_samples = image_folder(os.path.join(root, env))
        if classes is not None and env_classes != classes:
            raise DatasetError(
                f"{name}: domain {env!r} has classes {_diff(env_classes, classes)} while "
                f"domain {envs[0]!r} has {_diff(classes, env_classes)}; every domain needs the "
                "same class folders (labels are folder indices)")
        classes = env_classes
        if exclude:
            kept = [s for s in env_samples
                    if os.path.relpath(s[0], root).replace(os.sep, "/") not in exclude]
            excluded += len(env_samples) - len(kept)
            env_samples = kept
        if on_bad_image == "skip":
            env_samples, bad = _drop_unreadable(env_samples)
            skipped += bad
        samples.append(env_samples)
    return DomainDataset(name=name, root=root, envs=envs, classes=classes, samples=samples,
                         identity=_identity(name, root, envs, classes, samples),
                         n_steps=n_steps, checkpoint_freq=checkpoint_freq, excluded=excluded,
                         skipped=skipped)


def _diff(a, b):
    extra = [c for c in a if c not in b]
    return f"{len(a)} (incl. {extra[:5]} not in the other)" if extra else f"{len(a)}"


def resolve_name(name: str) -> Optional[str]:
    """Canonical DomainBed dataset name for a name or folder name, else None."""
    return _ALIASES.get(str(name).lower())


def load_domainbed(name_or_path, root=None, *, exclude_duplicates: bool = True,
                   duplicates_file=None, on_bad_image: str = "raise") -> DomainDataset:
    """Load a dataset by DomainBed name ("PACS", "office_home", ...), demo name, "tfds:NAME", or path.

    `root` is the data dir holding the DomainBed folders (`root/PACS`, `root/office_home`, ...);
    a root that is itself the dataset folder is accepted too. A path (or a name with no known
    spec) loads the generic `<domain>/<class>/<image>` layout. DomainNet drops DomainBed's
    duplicate files (list from `duplicates_file` / $RAT_JAX_DOMAINNET_DUPLICATES; without a
    list, the folder must already be cleaned by DomainBed's downloader).
    """
    key = os.fspath(name_or_path)
    if key.startswith("tfds:"):
        from rat_jax.data import tfds_source
        return tfds_source.load_tfds(key, data_dir=root)
    canon = resolve_name(key)
    if canon is not None:
        spec = SPECS[canon]
        if root is None:
            raise DatasetError(f"dataset {canon}: pass root=<data dir containing {spec.dirname}/>")
        root = os.fspath(root)
        path = os.path.join(root, spec.dirname)
        if not os.path.isdir(path) and os.path.basename(os.path.normpath(root)) == spec.dirname:
            path = root
        if not os.path.isdir(path):
            raise DatasetError(f"dataset {canon}: folder {path!r} not found; download it with "
                               f"DomainBed's download.py or pass root=<dir containing "
                               f"{spec.dirname}/>")
        exclude = None
        if canon == "DomainNet" and exclude_duplicates:
            exclude = domain_net_duplicates(duplicates_file)
            if exclude is None:
                _check_domain_net_cleaned(path)
        return load_folder(path, canon, spec.envs, exclude, spec.n_steps, spec.checkpoint_freq,
                           on_bad_image)
    from rat_jax.data import demo
    if key in demo.DEMO_DATASETS:
        return demo.load_demo(key, cache_dir=root)
    path = key if root is None or os.path.isabs(key) else os.path.join(os.fspath(root), key)
    if os.path.isdir(path):
        return load_folder(path, on_bad_image=on_bad_image)
    raise DatasetError(
        f"unknown dataset {key!r}: not a DomainBed name ({sorted(SPECS)}), demo name "
        f"({sorted(demo.DEMO_DATASETS)}), 'tfds:NAME', nor an existing folder"
        + (f" ({path!r})" if path != key else "")
        + "; pass one of those names or the path of a <domain>/<class>/<image> folder")
