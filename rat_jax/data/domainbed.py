"""DomainBed's datasets and the folder reader: `root/<domain>/<class>/<image>` in torchvision
ImageFolder order.

Env order = sorted sub-directory names (DomainBed `os.scandir` + `sorted`); inside an env,
classes = sorted folder names and files = sorted `os.walk` then sorted names, filtered by
IMG_EXTENSIONS (torchvision `make_dataset`). Split seeds select by index, so this order matters.

Environment: $DOMAINBED_DATA is the default data dir of `load_named` (the folder holding
DomainBed's dataset folders) when no root is passed.
"""
import concurrent.futures
import gzip
import hashlib
import os
from typing import List, Optional, Sequence, Tuple

from rat_jax.data.transforms import ImageDecodeError, decode
from rat_jax.data.types import IMG_EXTENSIONS, DatasetError, DatasetSpec, DomainDataset

DATA_ENV_VAR = "DOMAINBED_DATA"

# Env folder names as DomainBed's download.py leaves them; CHECKPOINT_FREQ per
# docs/protocol.md §3.1.
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
    `domainbed/misc/domain_net_duplicates.txt` at `path` (plain or .gz); None without a path."""
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
            f"(e.g. {found[0]!r}); pass domainnet_duplicates=<DomainBed's "
            "domainbed/misc/domain_net_duplicates.txt>, delete them with DomainBed's "
            "download.py, or pass exclude_duplicates=False to keep them")


def _drop_unreadable(samples, workers=4):
    """(kept, bad paths): decode every file once; used only with on_bad_image='skip'."""

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


def load_named(name: str, root=None, *, exclude_duplicates: bool = True,
               domainnet_duplicates=None, on_bad_image: str = "raise") -> DomainDataset:
    """A DomainBed dataset by name or folder name ("PACS", "office_home", ...) from `root`.

    `root` (default $DOMAINBED_DATA) holds DomainBed's folders (`root/PACS`, `root/office_home`,
    ...); a root that is itself the dataset folder is accepted too. The env folders must be
    exactly DomainBed's (`SPECS`). DomainNet drops DomainBed's duplicate files, listed in
    `domainnet_duplicates` (DomainBed's domainbed/misc/domain_net_duplicates.txt); without a
    list the folder must already be cleaned by DomainBed's downloader.
    """
    canon = resolve_name(name)
    if canon is None:
        raise DatasetError(f"{name!r} is not a DomainBed dataset; names are {sorted(SPECS)}")
    spec = SPECS[canon]
    root = root or os.environ.get(DATA_ENV_VAR)
    if not root:
        raise DatasetError(f"dataset {canon}: pass root=<data dir containing {spec.dirname}/> "
                           f"(--config.data_root on the command line) or set ${DATA_ENV_VAR}")
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
        exclude = domain_net_duplicates(domainnet_duplicates)
        if exclude is None:
            _check_domain_net_cleaned(path)
    return load_folder(path, canon, spec.envs, exclude, spec.n_steps, spec.checkpoint_freq,
                       on_bad_image)
