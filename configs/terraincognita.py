"""TerraIncognita as the target, the other four DomainBed datasets as auxiliary tasks (MR's
setting).

  python -m rat_jax.main --config=configs/terraincognita.py --workdir=runs/terraincognita \
      --config.data_root=/data/domainbed --config.foundation=/weights/resnet50-0676ba61.pth
Variants: `:smoke` (seconds, structure only, embedded data), `:cpu` (EfficientNet-Lite0, 64 px).
Trials 0, 1, 2 as the official sweeps (the † rows, ± over trials); `:cpu` runs trial 0 only.
"""
from configs import common


def get_config(arg=None):
    return common.domainbed_target("TerraIncognita", common.parse_variant(arg, __file__))
