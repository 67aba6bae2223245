"""`tfds:NAME[:SPLIT,SPLIT...]` as a DomainDataset, through `tfds.data_source` (ArrayRecord,
random access, no TensorFlow needed for prepared datasets). Each split becomes one env; a single
split makes a single-domain dataset (fine for an auxiliary task trained on all its envs).
Requires `pip install tensorflow-datasets` and a dataset already prepared in `data_dir`.
"""
import numpy as np

from rat_jax.data.types import DatasetError, DomainDataset


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
    """'tfds:mnist:train,test' -> ('mnist', ['train', 'test'])."""
    parts = spec.split(":")
    if parts[0] != "tfds" or len(parts) not in (2, 3) or not parts[1]:
        raise DatasetError(f"bad TFDS spec {spec!r}; write tfds:NAME or tfds:NAME:SPLIT[,SPLIT]")
    return parts[1], (parts[2].split(",") if len(parts) == 3 else ["train"])


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
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        sources = [tfds.data_source(name, split=s, data_dir=data_dir) for s in splits]
        classes = list(builder.info.features[label_key].names)
    except Exception as e:
        raise DatasetError(f"{spec}: cannot open the prepared TFDS dataset ({e}); prepare it "
                           f"once with `tfds build {name} --file_format=array_record` "
                           f"(data_dir={data_dir})") from e
    samples, arrays = [], []
    for split, src in zip(splits, sources):
        labels = [int(src[i][label_key]) for i in range(len(src))]
        samples.append([(f"{spec}/{split}/{i}", y) for i, y in enumerate(labels)])
        arrays.append(_Column(src, image_key))
    ident = f"tfds:{name}:{','.join(splits)}:{[len(s) for s in samples]}:{builder.info.version}"
    return DomainDataset(name=f"tfds_{name}", root=str(data_dir or ""), envs=list(splits),
                         classes=classes, samples=samples, identity=ident, arrays=arrays)
