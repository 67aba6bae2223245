"""PACS as the target, the other four DomainBed datasets as auxiliary tasks (MR's setting).

  python -m rat_jax.main --config=configs/pacs.py --workdir=runs/pacs \
      --config.data_root=/data/domainbed --config.foundation=/weights/resnet50-0676ba61.pth
Variants: `:smoke` (seconds, structure only, embedded data), `:cpu` (EfficientNet-Lite0, 64 px).
Trials 0, 1, 2 as the official sweeps (the † rows, ± over trials); `:cpu` runs trial 0 only.
"""
import importlib.util
import pathlib

# configs/ is not a package: load common.py by its path, next to this file, whatever the cwd.
_path = pathlib.Path(__file__).parent / "common.py"
_spec = importlib.util.spec_from_file_location("common", _path)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
    return common.domainbed_target("PACS", common.parse_variant(arg, __file__))
