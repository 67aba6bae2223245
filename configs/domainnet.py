"""DomainNet as the target, the other four DomainBed datasets as auxiliary tasks
(common.domainbed_target).

  python -m rat_jax.main --config=configs/domainnet.py --workdir=runs/domainnet \
      --config.data_root=/data/domainbed --config.foundation=/weights/resnet50-0676ba61.pth
"""
from configs import common


def get_config(arg=None):
    return common.domainbed_target("DomainNet", common.parse_variant(arg, __file__))
