"""The run model: what a config implies, without JAX and without training.

`planned_runs(config, root)` lists every members run of a config (a single target or a sweep)
as `PlannedRun`s: stage, dataset, folder, members, steps, evaluation schedule, images, the runs
it starts from (`deps`) and its role in the stage graph; `plan_jobs` turns them into the
scheduler's jobs (rat_jax.schedule: each run, a selection per test env, a table per target).
The same objects are executed (rat_jax.pipeline), counted by `--plan` (rat_jax.sweep) and
reported by rat_jax.status. Also the sweep configs' helpers (`target_config`, ...).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
from typing import Callable, Sequence

import ml_collections

from rat_jax.data import SPECS
from rat_jax.data.protocol import aux_init_assignment

TARGETS_DIR = "targets"
# Image totals and classes of the DomainBed datasets: the usual DomainBed figures
# (docs/protocol.md §3.1), not read from data. The plan splits a total evenly over the envs.
DOMAINBED_IMAGES = {"VLCS": 10_729, "PACS": 9_991, "OfficeHome": 15_588,
                    "TerraIncognita": 24_788, "DomainNet": 586_575}
DOMAINBED_CLASSES = {"VLCS": 5, "PACS": 7, "OfficeHome": 65, "TerraIncognita": 10,
                     "DomainNet": 345}
# A forward pass costs about a third of a training step (forward + backward) per image: the
# weight of evaluation images and of linear-probe images (frozen featurizer) in the estimate.
FORWARD_COST = 1 / 3


def _plain(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))


def is_sweep(config) -> bool:
    """Whether `config` (ConfigDict or the dict of a config.json) is a sweep config."""
    return "sweep" in config


def target_names(config) -> list[str]:
    """The targets of a sweep config, in column order (the one target of a plain config)."""
    if is_sweep(config):
        return [str(t) for t in config["sweep"]["targets"]]
    return [str(config["target"]["name"])]


def target_dict(config, name: str) -> dict:
    """Target `name`'s config as a plain dict: the sweep's shared fields, `datasets[name]` as the
    target and every other dataset as an auxiliary task (all its domains)."""
    cfg = _plain(config)
    datasets = cfg["datasets"]
    if name not in datasets:
        raise ValueError(f"config.sweep.targets has {name!r}, which is not a key of "
                         f"config.datasets ({sorted(datasets)})")
    d = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in ("sweep", "datasets")}
    d["target"] = copy.deepcopy(dict(datasets[name]))
    d["aux"] = {other: dict(copy.deepcopy(dict(e)), test_envs=())
                for other, e in datasets.items() if other != name}
    return d


def target_config(config, name: str) -> ml_collections.ConfigDict:
    """Target `name`'s config (what one `python -m rat_jax.main` of configs/<T>.py would run)."""
    return ml_collections.ConfigDict(target_dict(config, name))


# ---------------------------------------------------------------------------------------------
# The runs a config implies (no JAX)
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    name: str                         # the dataset's name (DomainDataset.name)
    env_sizes: tuple                  # images per env (evenly split totals for DomainBed)
    num_classes: int
    exact: bool                       # sizes counted from the data, not the DomainBed table
    decoded_bytes: float | None = None  # its images decoded (uint8 RGB), when known

    @property
    def num_envs(self) -> int:
        return len(self.env_sizes)


def _domainbed_name(name: str) -> str | None:
    for key, spec in SPECS.items():
        if str(name).lower() in (key.lower(), spec.dirname.lower()):
            return key
    return None


def dataset_info(entry: dict, cfg: dict) -> DatasetInfo:
    """Envs, sizes and classes of a config dataset entry: DomainBed datasets from SPECS and the
    DomainBed figures (no data needed); any other dataset is loaded (the embedded ones are
    built on first use)."""
    name = str(entry["name"])
    db = _domainbed_name(name)
    if db is not None:
        n = len(SPECS[db].envs)
        total = DOMAINBED_IMAGES[db]
        return DatasetInfo(db, tuple([total / n] * n), DOMAINBED_CLASSES[db], False)
    from rat_jax.data import load_dataset
    root = entry.get("root") or (cfg.get("data_root") if not name.startswith("tfds:") else "")
    ds = load_dataset(name, root or None, cache_dir=cfg.get("cache_dir") or None)
    return DatasetInfo(ds.name, tuple(len(s) for s in ds.samples), ds.num_classes, True,
                       decoded_bytes(ds))


def decoded_bytes(ds) -> float:
    """Bytes of `ds`'s images decoded: its arrays, or an estimate from its files' headers."""
    arrays = getattr(ds, "arrays", None)
    if arrays is not None:
        return float(sum(a.nbytes for a in arrays))
    from rat_jax.data.store import ImageStore
    store = ImageStore(ds, cache_dir=None)
    return float(sum(store.estimate_train_bytes(e) for e in range(ds.num_envs)))


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """One members run (one group of members trained together)."""
    stage: str                        # one of STAGES
    dataset: str                      # the dataset it trains on
    name: str                         # its store name: lp/..., aux/..., target/...
    path: pathlib.Path                # its folder
    members: int
    steps: int
    checkpoint_freq: int
    images_per_step: int              # per member: batch_size x training envs
    eval_images: float                # per member and evaluation point
    classifier_only: bool
    num_classes: int
    final_images: float = 0.0         # per member, once after the run (lean records)
    role: tuple = ()                  # ("aux_lp", A), ("aux", A), ("lp", k), ("target", k, t)
    deps: tuple = ()                  # the folders of the runs it starts from

    @property
    def evaluations(self) -> int:
        return len(set(range(0, self.steps, self.checkpoint_freq)) | {self.steps - 1})

    @property
    def member_steps(self) -> int:
        return self.members * self.steps

    @property
    def train_images(self) -> int:
        return self.member_steps * self.images_per_step

    @property
    def all_eval_images(self) -> float:
        return self.members * (self.evaluations * self.eval_images + self.final_images)

    def cost(self) -> float:
        """Work in full-training-image units (forward-only images weigh FORWARD_COST)."""
        train = self.train_images * (FORWARD_COST if self.classifier_only else 1.0)
        return train + FORWARD_COST * self.all_eval_images


def _eval_images(info: DatasetInfo, test_envs: Sequence[int], d: dict) -> tuple[float, float]:
    """Images scored per member (stages.eval_sets): at each evaluation point (the train envs'
    out splits; with eval_all_splits every env's in/out split) and once after the run (lean
    records: the test envs' in/out splits, on the best and on the final params)."""
    hold, cap = float(d["holdout_fraction"]), int(d.get("max_eval_images", 0))
    capped = lambda n: min(n, cap) if cap > 0 else n
    point = final = 0.0
    for env, size in enumerate(info.env_sizes):
        both = capped(size * (1 - hold)) + capped(size * hold)
        if d.get("eval_all_splits", False):
            point += both
        elif env in set(test_envs):
            final += 2 * both
        else:
            point += capped(size * hold)
    return point, final


def _target_runs(d: dict, info: Callable[[dict], DatasetInfo], own: pathlib.Path,
                 shared: pathlib.Path) -> list[PlannedRun]:
    """The runs of one target config `d` (a plain dict), as Pipeline.run trains them."""
    bs = int(d["batch_size"])
    aux = d.get("aux") or {}
    n_runs, n_hparams = int(d["n_aux_hparams"]), int(d["n_hparams"])
    aux_root = pathlib.Path(d["aux_pool_dir"]).absolute() if d.get("aux_pool_dir") else None
    probe = int(d["lp_probe_steps"])
    runs = []
    for a in sorted(aux):
        e, i = aux[a], info(aux[a])
        steps, cf = int(e["steps"]), int(e["checkpoint_freq"])
        lp_dir = shared / "lp" / f"{a}_notest"
        runs.append(PlannedRun("linear probes", a, f"lp/{a}_notest", lp_dir,
                               1, probe if probe > 0 else steps, cf, bs * i.num_envs,
                               _eval_images(i, [], d)[0], True, i.num_classes,
                               role=("aux_lp", a)))
        runs.append(PlannedRun("auxiliary pools", a, f"aux/{a}_notest",
                               (aux_root or shared / "aux") / f"{a}_notest", n_runs, steps, cf,
                               bs * i.num_envs, _eval_images(i, [], d)[0], False,
                               i.num_classes, role=("aux", a), deps=(lp_dir,)))
    pool = tuple(r.path for r in runs if r.role[0] == "aux")
    t = d["target"]
    ti = info(t)
    steps, cf = int(t["steps"]), int(t["checkpoint_freq"])
    names = sorted(aux)
    aux_init = sum(aux_init_assignment(h, names, n_runs) != "imagenet"
                   for h in range(n_hparams)) if names else 0
    members = n_hparams + aux_init + (n_hparams if d.get("run_fusing", True) and names else 0)
    for k in list(t["test_envs"]) or range(ti.num_envs):
        per_step, (ev, final) = bs * (ti.num_envs - 1), _eval_images(ti, [k], d)
        name = f"{ti.name}_test{k}"
        runs.append(PlannedRun("linear probes", ti.name, f"lp/{name}", own / "lp" / name, 1,
                               probe if probe > 0 else steps, cf, per_step, ev, True,
                               ti.num_classes, final, role=("lp", k)))
        for trial in d["trials"]:
            run = f"{name}_trial{trial}"
            runs.append(PlannedRun("target runs", ti.name, f"target/{run}", own / "target" / run,
                                   members, steps, cf, per_step, ev, False, ti.num_classes,
                                   final, role=("target", k, trial),
                                   deps=(own / "lp" / name,) + pool))
    return runs


def target_runs(config, own: str | os.PathLike, shared: str | os.PathLike,
                info: Callable[[dict, dict], DatasetInfo] = dataset_info) -> list[PlannedRun]:
    """The runs of one target config (not a sweep): its own under `own`, the auxiliary probes
    and pools under `shared` (a sweep's root; `own` for a single run)."""
    d = _plain(config)
    cache: dict = {}

    def get(entry):
        key = (entry["name"], entry.get("root", ""))
        if key not in cache:
            cache[key] = info(entry, d)
        return cache[key]
    return _target_runs(d, get, pathlib.Path(own).absolute(), pathlib.Path(shared).absolute())


def plan_jobs(runs: Sequence[PlannedRun], root: str | os.PathLike) -> list:
    """The scheduler's jobs (rat_jax.schedule.Job) of planned runs, named by their folders
    relative to `root`: every run, a selection per (target folder, test env) right after its
    trials (its cost: the members' forward passes over the test env, as the lean records'), and
    a table per target folder after its selections. What a run, a sweep and --plan schedule."""
    from rat_jax.schedule import Job
    root = pathlib.Path(root).absolute()
    name = lambda path: os.path.relpath(path, root)
    jobs = [Job(name(r.path), "run", tuple(name(d) for d in r.deps), r.members, r.cost(), r)
            for r in runs]
    by_target: dict = {}
    for j in jobs:
        if j.run.role[0] == "target":
            own = j.run.path.parent.parent
            by_target.setdefault(own, {}).setdefault(j.run.role[1], []).append(j)
    for own, by_env in by_target.items():
        selections = []
        for k, trials in by_env.items():
            cost = FORWARD_COST * sum(t.run.members * t.run.final_images for t in trials)
            sel = Job(name(own / "models" / f"env{k}"), "selection",
                      tuple(t.name for t in trials), cost=cost, env=k)
            jobs.insert(jobs.index(trials[-1]) + 1, sel)
            selections.append(sel)
        jobs.insert(jobs.index(selections[-1]) + 1,
                    Job(name(own / "results.json"), "table", tuple(s.name for s in selections)))
    return jobs


def planned_runs(config, root: str | os.PathLike,
                 info: Callable[[dict, dict], DatasetInfo] = dataset_info) -> list[PlannedRun]:
    """Every members run `config` (ConfigDict or config.json's dict) implies under `root`, each
    shared run (auxiliary probes and pools) once, in the order the sweep trains them."""
    root = pathlib.Path(root).absolute()
    cache: dict = {}

    def cached(cfg):
        def get(entry):
            key = (entry["name"], entry.get("root", ""))
            if key not in cache:
                cache[key] = info(entry, cfg)
            return cache[key]
        return get
    if not is_sweep(config):
        d = _plain(config)
        return _target_runs(d, cached(d), root, root)
    runs, seen = [], set()
    for name in target_names(config):
        d = target_dict(config, name)
        for r in _target_runs(d, cached(d), root / TARGETS_DIR / name, root):
            if r.path not in seen:
                seen.add(r.path)
                runs.append(r)
    return runs


def target_dirs(config, root: str | os.PathLike) -> dict:
    """{target: the folder of its per-env table} (the root itself for a plain config)."""
    root = pathlib.Path(root).absolute()
    if not is_sweep(config):
        return {target_names(config)[0]: root}
    return {t: root / TARGETS_DIR / t for t in target_names(config)}
