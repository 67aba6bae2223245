"""The paper's whole DomainBed table from one command: every dataset a target in turn.

  python -m rat_jax.main --config=configs/paper.py --workdir=runs/paper \
      --config.data_root=/data/domainbed --config.foundation=/weights/resnet50-0676ba61.pth
  python -m rat_jax.main --config=configs/paper.py --workdir=runs/paper --plan   # size, no training
  python -m rat_jax.status --workdir runs/paper                                  # what is done

The shape of a sweep config (rat_jax/sweep.py): the reference base fields of
`common.domainbed_target` (one value for every target), plus
  datasets       every dataset of the sweep, name -> dataset entry (its test envs held out in turn
                 when it is the target; all its domains when it is an auxiliary task)
  sweep.targets  the datasets that are targets, in the table's column order; each target uses
                 every other entry of `datasets` as an auxiliary task (MR's setting)
Each auxiliary linear probe and auxiliary pool (lp/<A>_notest, aux/<A>_notest) and the converted
foundation are trained once, at the sweep's root, and loaded by every target that needs them;
each target's own runs, soups and per-env table are under targets/<T>/. The combined table
(rows: the paper's methods; columns: the datasets and their average) is results.md /
results.json at the root. Variant `:smoke`: the same sweep on the embedded datasets (digits,
textures, glyphs, each a target with the two others as auxiliary tasks), the tiny random
network of `common.smoke`, seconds to a minute or two on a CPU.
"""
import ml_collections

from configs import common

# The paper's column order (its table, docs/protocol.md §6.1).
TARGETS = ("PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet")
SMOKE_TARGETS = ("digits", "textures", "glyphs")


def _sweep(c: ml_collections.ConfigDict, datasets: dict, targets) -> ml_collections.ConfigDict:
    """A per-target config `c` turned into a sweep config: its target and aux entries are
    replaced by `datasets` and `sweep.targets` (rat_jax.sweep.target_config undoes it)."""
    del c["target"], c["aux"]
    c.datasets = ml_collections.ConfigDict(datasets)  # name -> dataset entry (common.dataset)
    c.sweep = ml_collections.ConfigDict(dict(
        targets=tuple(targets),       # the targets, in the combined table's column order
    ))
    return c


def get_config(arg=None):
    variant = common.parse_variant(arg, __file__, allowed=("smoke",))
    if variant == "smoke":
        c = common.smoke(common.base())
        c.make_plots = False          # the sweep's smoke checks the table, not the figures
        c.n_hparams = 3               # 3 no-aux + 2 aux-init + 3 fusing members per target run
        datasets = {name: common.dataset(name, test_envs=(0,), steps=4, checkpoint_freq=2)
                    for name in SMOKE_TARGETS}
        return _sweep(c, datasets, SMOKE_TARGETS)
    # The reference settings of every DomainBed config (ResNet-50, 224 px, batch 32 per domain,
    # N_STEPS / CHECKPOINT_FREQ of rat_jax.data.SPECS, 20 members, 4 aux runs, trials 0, 1, 2).
    c = common.domainbed_target(TARGETS[0])
    datasets = {name: common.dataset(name, test_envs=range(len(common.SPECS[name].envs)))
                for name in TARGETS}
    return _sweep(c, datasets, TARGETS)
