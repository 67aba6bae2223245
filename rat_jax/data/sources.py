"""One entry point from a dataset name or path to a DomainDataset: `load_dataset`.

Sources, tried in this order:
- "tfds:NAME[:SPLIT,SPLIT]": a prepared TFDS dataset (`tfds_source`), `root` = TFDS data_dir;
- a DomainBed name or folder name ("PACS", "office_home", ...): `domainbed.load_named` under
  `root` (default $DOMAINBED_DATA), env folders checked against `domainbed.SPECS`;
- a demo name ("digits", "textures", "glyphs"): built once into `cache_dir`, then read
  (`demo`);
- a folder path (relative paths resolve against `root` when given): any
  `<domain>/<class>/<image>` folder (`domainbed.load_folder`).
"""
import os
from typing import Optional

from rat_jax.data import demo, domainbed, tfds_source
from rat_jax.data.types import DatasetError, DomainDataset


def load_dataset(name_or_path, root=None, *, cache_dir=None, usps: Optional[bool] = True,
                 exclude_duplicates: bool = True, domainnet_duplicates=None,
                 on_bad_image: str = "raise") -> DomainDataset:
    """The dataset named by `name_or_path` (see the module docstring for the sources).

    root: the folder holding DomainBed's dataset folders (a DomainBed name; default
    $DOMAINBED_DATA), the TFDS data_dir ("tfds:"), or the base of a relative folder path; not
    used for demo names. cache_dir: where demo datasets are built (default $RAT_JAX_CACHE or
    ~/.cache/rat_jax). usps: demo "digits" only; True builds it with its USPS domain (and
    rebuilds a build made with usps=False), False builds it without, None reuses any build.
    exclude_duplicates / domainnet_duplicates: DomainNet only; the path of DomainBed's
    domainbed/misc/domain_net_duplicates.txt, whose files are left out (DomainBed's downloader
    deletes them). on_bad_image: "raise" or "skip" (folder sources; see `load_folder`).
    """
    key = os.fspath(name_or_path)
    if key.startswith("tfds:"):
        return tfds_source.load_tfds(key, data_dir=root)
    if domainbed.resolve_name(key) is not None:
        return domainbed.load_named(key, root, exclude_duplicates=exclude_duplicates,
                                    domainnet_duplicates=domainnet_duplicates,
                                    on_bad_image=on_bad_image)
    if key in demo.DEMO_DATASETS:
        return demo.load_demo(key, cache_dir, usps=usps)
    path = key if root is None or os.path.isabs(key) else os.path.join(os.fspath(root), key)
    if os.path.isdir(path):
        return domainbed.load_folder(path, on_bad_image=on_bad_image)
    raise DatasetError(
        f"unknown dataset {key!r}: not a DomainBed name ({sorted(domainbed.SPECS)}), demo name "
        f"({sorted(demo.DEMO_DATASETS)}), 'tfds:NAME', nor an existing folder"
        + (f" ({path!r})" if path != key else "")
        + "; pass one of those names or the path of a <domain>/<class>/<image> folder")
