"""DomainNet as the target, the other four DomainBed datasets as auxiliary tasks (MR's setting).

  python -m rat_jax.main --config=configs/domainnet.py --workdir=runs/domainnet \
      --config.data_root=/data/domainbed --config.foundation=/weights/resnet50-0676ba61.pth
Variants: `:smoke` (seconds, structure only, embedded data), `:cpu` (EfficientNet-Lite0, 64 px).
"""
from rat_jax import config_lib


def get_config(arg=None):
    return config_lib.domainbed_target("DomainNet", arg)
