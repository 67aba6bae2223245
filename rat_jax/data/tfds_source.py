"""`tfds:NAME[:SPLIT,SPLIT...]` as a DomainDataset, through a prepared TFDS dataset's ArrayRecord
files (`DatasetBuilder.as_data_source`: random access, no TensorFlow needed). Each split becomes
one env; a single split makes a single-domain dataset (fine for an auxiliary task trained on all
its envs). A split may be sliced as TFDS allows (`tfds:cifar10:train[:5000]`).

Data directory: `data_dir`, or TFDS's own default when None ($TFDS_DATA_DIR, else
~/tensorflow_datasets), exactly as `tfds.builder` resolves it. The dataset must be prepared there
in the array_record format (`tfds build NAME --file_format=array_record`); nothing is downloaded.
Labels are read at load with every other feature left encoded (`tfds.decode.SkipDecoding`), so
no image is decoded then; an image is decoded when the image store or loader first reads it.
Requires `pip install tensorflow-datasets` (`rat_jax[tfds]`).
"""
import os

import numpy as np

from rat_jax.data.types import DatasetError, DomainDataset

LABEL_BATCH = 4096                    # records per batched label read


class _Column:
    """Lazy `source[i][key]` as uint8 RGB, so images decode only when used."""

    def __init__(self, source, key):
        self.source, self.key = source, key

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        x = np.asarray(self.source[int(i)][self.key])
        if x.ndim == 2 or x.shape[-1] == 1:
            x = np.repeat(x.reshape(x.shape[0], x.shape[1], 1), 3, axis=-1)
        return x.astype(np.uint8)


def parse(spec: str):
    """'tfds:mnist:train,test' -> ('mnist', ['train', 'test']); a split may hold ':' (slices)."""
    parts = spec.split(":", 2)
    if parts[0] != "tfds" or len(parts) not in (2, 3) or not parts[1] or "" in parts[2:]:
        raise DatasetError(f"bad TFDS spec {spec!r}; write tfds:NAME or tfds:NAME:SPLIT[,SPLIT]")
    return parts[1], (parts[2].split(",") if len(parts) == 3 else ["train"])


def prepare_command(name: str, data_dir) -> str:
    """The command that prepares `name` where `load_tfds` reads it."""
    return f"tfds build {name} --data_dir={data_dir} --file_format=array_record"


def read_labels(source, label_key: str = "label", batch: int = LABEL_BATCH) -> list:
    """Every record's label from a data source opened with the other features left encoded,
    in batched reads where the source supports them (`__getitems__`)."""
    n, labels = len(source), []
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, batch):
        keys = range(start, min(n, start + batch))
        records = getitems(list(keys)) if getitems else [source[i] for i in keys]
        labels += [int(r[label_key]) for r in records]
    return labels


def load_tfds(spec: str, data_dir=None, image_key: str = "image", label_key: str = "label",
              tfds_module=None) -> DomainDataset:
    name, splits = parse(spec)
    tfds = tfds_module
    if tfds is None:
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise DatasetError(f"{spec}: tensorflow_datasets is not installed; "
                               "`pip install rat_jax[tfds]` (TensorFlow itself is not needed "
                               "to read prepared ArrayRecord datasets)") from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # unknown name, unreadable folder: say what to run
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # TFDS's default data directory, for the message only (tfds resolves the real one)
        where = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
            os.path.join("~", "tensorflow_datasets"))
        raise DatasetError(f"{spec}: TFDS cannot open dataset {name!r} in the data directory "
                           f"{where} ({first}); check the name, or prepare it with "
                           f"`{prepare_command(name, where)}`") from e
    root = str(data_dir or builder.data_dir_root)
    if not builder.is_prepared():
        raise DatasetError(
            f"{spec}: the TFDS dataset {name!r} is not prepared in the data directory {root} "
            f"(no {builder.data_dir}); rat_jax downloads nothing. Prepare it once with "
            f"`{prepare_command(name, root)}` (without network here, build it elsewhere and copy "
            f"its {name}/ folder into {root}), or set $TFDS_DATA_DIR or the dataset entry's "
            "root to the data directory that holds it.")
    features = builder.info.features
    missing = [k for k in (image_key, label_key) if k not in features]
    if missing or not hasattr(features[label_key], "names"):
        raise DatasetError(f"{spec}: rat_jax reads an image feature {image_key!r} and a class "
                           f"label feature {label_key!r}; {name} has {sorted(features)}")
    # Labels only: every other top-level leaf feature stays encoded (no image decoded at load);
    # nested dicts and sequences (boxes, metadata: no SkipDecoding there) decode as they are.
    encoded = {k: tfds.decode.SkipDecoding() for k, f in features.items()
               if k != label_key and not (hasattr(f, "keys") or hasattr(f, "feature"))}
    try:
        images = [builder.as_data_source(s) for s in splits]
        label_sources = [builder.as_data_source(s, decoders=encoded) for s in splits]
    except NotImplementedError as e:  # prepared, but not in a random-access format
        raise DatasetError(f"{spec}: {name} is prepared in {builder.data_dir} in a format "
                           f"other than array_record, which rat_jax reads: "
                           f"`{prepare_command(name, root)}`") from e
    except Exception as e:  # unknown split, bad slice
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"{spec}: cannot open splits {splits} of {name} ({first}); its "
                           f"splits: {sorted(builder.info.splits)}") from e
    samples = []
    for split, src in zip(splits, label_sources):
        samples.append([(f"{spec}/{split}/{i}", y)
                        for i, y in enumerate(read_labels(src, label_key))])
    ident = f"tfds:{name}:{','.join(splits)}:{[len(s) for s in samples]}:{builder.info.version}"
    return DomainDataset(name=f"tfds_{name}", root=str(builder.data_dir), envs=list(splits),
                         classes=list(features[label_key].names), samples=samples,
                         identity=ident, arrays=[_Column(src, image_key) for src in images])
