"""The stages of Model Ratatouille as functions with explicit arguments (docs/protocol.md §0):

  foundation -> linear probe (per auxiliary dataset; per target test env) -> auxiliary pool ->
  target members (no-aux, aux-init, fusing) -> selection (rat_jax.selection) -> report.

`python -m rat_jax.main` (through `rat_jax.pipeline.Pipeline`) and the functional API
(`rat_jax.api`) call these same functions. Every members run goes through `train_group`: one
loader, one set of evaluation splits, one engine call. Where results are kept is the `store`'s
business: `MemoryStore` (the default) trains and returns; the pipeline's `WorkdirStore` adds
fingerprinted results and resume from Orbax checkpoints.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from rat_jax import checkpoint, distributed, runtime, soups, trees
from rat_jax.data import DomainDataset, FeedOptions, ImageStore, MemberLoader, StreamSpec
from rat_jax.data.protocol import (aux_init_assignment, default_hparams, random_hparams,
                                   run_seed)
from rat_jax.engine import (EngineConfig, LoopConfig, RunOutput, TrainResult, id_val_names,
                            make_hparams, train_members)
from rat_jax.evaluation import EvalSplit, SplitSpec, eval_split
from rat_jax.engine.progress import NO_WRITER, Console, have_tensorboard
from rat_jax.engine.savepoints import SAVE_MINUTES
from rat_jax.files import fingerprint, write_json_atomic
from rat_jax.foundation import load_foundation
from rat_jax.models import create_model
from rat_jax.models.layers import torch_linear_init
from rat_jax.specs import AuxRuns, MemberSpec

FOUNDATION = "foundation"
log = logging.getLogger("rat_jax")
DATA_PARALLEL = {"auto": None, "on": True, "off": False, "true": True, "false": False}

__all__ = ["FOUNDATION", "AuxRuns", "Foundation", "GroupResult", "GroupRun", "MemberSpec",
           "MemoryStore", "TargetPlan", "TrainSettings", "WorkdirStore", "aux_pool", "eval_sets",
           "linear_probe", "load_foundation", "member_hparams", "new_head", "target_members",
           "train_group"]


# ---------------------------------------------------------------------------------------------
# Settings shared by every members run
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """The fields of a config that shape every members run (model, data, evaluation, engine).

    `TrainSettings.from_config(config)` gives a notebook exactly the CLI's settings.
    """
    arch: str
    image_size: int = 224
    batch_size: int = 32                  # images per training domain per member step
    eval_batch_size: int = 64
    holdout_fraction: float = 0.2
    validation_augment: bool = True       # ID-val scored on augmented images, as the reference
    eval_all_splits: bool = False         # True: every env's in/out at every evaluation point
    max_eval_images: int = 0              # > 0: a fixed subset per evaluation split
    lr_scale: float = 1.0
    conv_impl: str = "auto"
    compute_dtype: str = "float32"
    strategy: str = "auto"
    remat: bool | str = False
    data_parallel: str | bool = "auto"
    cpu_ynn: str = "auto"
    device_prefetch: int = 1              # training batches placed on the devices ahead
    save_minutes: float = SAVE_MINUTES    # resume checkpoint every so many minutes (and on SIGTERM)
    save_every: int = 0                   # > 0: also every so many steps
    cache_dir: str = ""                   # decoded-image cache ("" = the default location)
    augment_on: str = "auto"              # training augmentation: "host", "device" or "auto"
    train_cache_side: int = 0             # 0: crops from the original images; S: cached capped
    quiet: bool = False
    tensorboard: bool = False             # TensorBoard scalars per member (not fingerprinted)
    devices: tuple | None = None          # the devices a run uses (None: all; the scheduler's)

    def __post_init__(self):
        if str(self.augment_on).lower() not in ("auto", "host", "device"):
            raise ValueError(f"augment_on={self.augment_on!r}: use 'auto', 'host' or 'device' "
                             "(config.augment_on)")
        if str(self.data_parallel).lower() not in DATA_PARALLEL:
            raise ValueError(f"data_parallel={self.data_parallel!r}: use 'auto', 'on' or 'off' "
                             "(config.engine.data_parallel)")
        if self.tensorboard and not have_tensorboard():
            raise ImportError(NO_WRITER)

    @classmethod
    def from_config(cls, config) -> "TrainSettings":
        e = config.engine
        return cls(arch=config.arch, image_size=config.image_size, batch_size=config.batch_size,
                   eval_batch_size=config.eval_batch_size,
                   holdout_fraction=config.holdout_fraction,
                   validation_augment=bool(config.validation_augment),
                   eval_all_splits=bool(config.eval_all_splits),
                   max_eval_images=config.max_eval_images, lr_scale=config.lr_scale,
                   conv_impl=config.conv_impl, compute_dtype=e.compute_dtype,
                   strategy=e.strategy, remat=e.remat, data_parallel=e.data_parallel,
                   cpu_ynn=e.get("cpu_ynn", "auto"),
                   device_prefetch=int(e.get("device_prefetch", 1)),
                   save_minutes=float(config.get("save_minutes", SAVE_MINUTES)),
                   save_every=int(config.get("save_every", 0) or 0),
                   cache_dir=config.cache_dir, quiet=config.quiet,
                   tensorboard=bool(config.get("tensorboard", False)),
                   augment_on=config.get("augment_on", "auto"),
                   train_cache_side=int(config.get("train_cache_side", 0)))

    def replace(self, **changes) -> "TrainSettings":
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> list:
        """What changes a run's numbers (engine, cache, console and TensorBoard settings do
        not: a rerun with them changed loads the finished runs)."""
        fp = [self.arch, self.image_size, self.batch_size, self.holdout_fraction,
              bool(self.validation_augment), self.max_eval_images, self.lr_scale,
              bool(self.eval_all_splits)]
        # a capped training cache changes the crops of larger images
        return fp + [int(self.train_cache_side)]

    def augment_mode(self) -> str:
        """Where training augmentation runs: "device" on accelerators and "host" on CPU for
        "auto" (bench/loader.py: XLA:CPU's resize and colour ops cost more than Pillow's)."""
        mode = str(self.augment_on).lower()
        if mode == "auto":
            return "host" if jax.default_backend() == "cpu" else "device"
        return mode

    def cache_kw(self) -> dict:
        return {"cache_dir": self.cache_dir} if self.cache_dir else {}

    @property
    def data_parallel_flag(self) -> bool | None:
        """`data_parallel` as the engine reads it: True, False or None (by backend)."""
        return DATA_PARALLEL[str(self.data_parallel).lower()]

    @property
    def engine_strategy(self) -> str | None:
        """`strategy` as the engine reads it: None (by backend) for "auto"."""
        return None if self.strategy == "auto" else self.strategy

    def engine_config(self, batch_size: int | None = None,
                      classifier_only: bool = False) -> EngineConfig:
        """The member engine's settings of a members run with `batch_size` images per member
        per step."""
        return EngineConfig(batch_size=batch_size, strategy=self.engine_strategy,
                            classifier_only=classifier_only, remat=self.remat,
                            data_parallel=self.data_parallel_flag, cpu_ynn=self.cpu_ynn,
                            devices=self.devices, device_prefetch=self.device_prefetch)

    def stream_spec(self) -> StreamSpec:
        """What the member loader's training batches hold (augmented, on the host or the
        device by augment_mode())."""
        return StreamSpec(batch_size=self.batch_size, image_size=self.image_size, augment=True,
                          holdout_fraction=self.holdout_fraction,
                          augment_on=self.augment_mode(), cache_side=self.train_side)

    @property
    def train_side(self) -> int | None:
        """The cached side of training crops (None: the original images)."""
        return int(self.train_cache_side) or None

    def model(self, num_classes: int):
        return create_model(self.arch, num_classes, conv_impl=self.conv_impl,
                            dtype=self.compute_dtype)


# ---------------------------------------------------------------------------------------------
# Results of one members run, and where they are kept
# ---------------------------------------------------------------------------------------------
PARAMS = ("best", "final")  # the params a members run yields: best ID-val and last


@dataclasses.dataclass
class GroupResult:
    """Stacked outputs of one members run (numpy, leading member axis); `info[i]` is member i's
    MemberSpec (hparams, seed, init, group, h)."""
    best_params: Any
    final_params: Any
    best_score: np.ndarray
    nonfinite: np.ndarray
    info: list[MemberSpec]

    @classmethod
    def from_train(cls, result: TrainResult, info: Sequence[MemberSpec]) -> "GroupResult":
        return cls(trees.to_host(result.best_params), trees.to_host(result.final_params),
                   np.asarray(result.best_score), np.asarray(result.nonfinite),
                   [MemberSpec.of(m) for m in info])

    def save(self, directory: pathlib.Path, keep: Sequence[str] = PARAMS) -> None:
        """Write the result; `keep`: which params ("best", "final") go to disk."""
        bad = sorted(set(keep) - set(PARAMS))
        if bad:
            raise ValueError(f"keep={list(keep)}: {bad} unknown; use a subset of {PARAMS}")
        tree = {"best_score": self.best_score, "nonfinite": self.nonfinite}
        for which in keep:
            tree[f"{which}_params"] = getattr(self, f"{which}_params")
        checkpoint.save_pytree(directory / "result", tree, force=True)

    @classmethod
    def load(cls, directory: pathlib.Path, info: Sequence[MemberSpec]) -> "GroupResult":
        """A saved result; params that were not kept are None."""
        tree = checkpoint.restore_pytree(directory / "result")
        get = lambda k: trees.to_host(tree[k]) if k in tree else None
        return cls(get("best_params"), get("final_params"), np.asarray(tree["best_score"]),
                   np.asarray(tree["nonfinite"]), list(info))

    def keeping(self, keep: Sequence[str]) -> "GroupResult":
        """This result with only the params in `keep` ("best", "final"); the others None (as
        `load` gives them when they were not saved), so that they are freed."""
        return dataclasses.replace(self, **{f"{which}_params": None for which in PARAMS
                                            if which not in keep})

    def subset(self, idx: Sequence[int]) -> "GroupResult":
        idx = list(idx)
        pick = lambda t: None if t is None else trees.select(t, idx)
        return GroupResult(pick(self.best_params), pick(self.final_params), self.best_score[idx],
                           self.nonfinite[idx], [self.info[i] for i in idx])

    @property
    def ok(self) -> list[int]:
        """Members to use downstream: flagged (non-finite) members are excluded."""
        return [i for i in range(len(self.best_score)) if not self.nonfinite[i]]


class MemoryStore:
    """Train every run, keep nothing on disk (the API's default)."""

    def __init__(self):
        self.trained_members = 0

    def run(self, name: str, fp: str, info: Sequence[MemberSpec],
            train: Callable[[pathlib.Path | None, pathlib.Path | None], GroupResult],
            keep: Sequence[str] = PARAMS) -> GroupResult:
        """Train (or load) run `name`: `train(directory, tensorboard)` trains it with its
        records and checkpoints in `directory` and its TensorBoard event files in `tensorboard`
        (None, None here: in memory); `keep`: the params later stages read ("best", "final")."""
        del name, fp, info, keep
        result = train(None, None)
        self.trained_members += len(result.best_score)
        return result

    def write_json(self, name: str, obj: Any) -> None:
        del name, obj


class WorkdirStore(MemoryStore):
    """Runs under `root/<name>/`: a finished run (its `done.json` fingerprint matches) is loaded,
    an unfinished one resumes from its Orbax checkpoints. Names under `aux/` go to `aux_root`
    when given (an auxiliary pool shared between runs). With `shared_root` (a sweep's root,
    rat_jax.sweep), what does not depend on the target goes there instead of `root`: the
    auxiliary pool (`aux/*`, unless `aux_root` is given) and the auxiliary linear probes
    (`lp/*_notest`), so that every target of a sweep loads the same runs. Process 0 writes the
    markers. `trained_runs` lists (name, members) of the runs this store trained.

    Once a run is done its result keeps only the params later stages read (`keep`: the best
    for target runs and linear probes, the final for auxiliary runs) and its resume checkpoints
    are deleted; `keep_checkpoints` keeps both params and the checkpoints. A finished run whose inputs changed is retrained, and
    that is logged. A run loaded because it is done is announced on the console (main process,
    unless `quiet`). A run's TensorBoard event files go to `root/tensorboard/<name>` (the
    `tensorboard` folder given to its `train`)."""

    def __init__(self, root: str | pathlib.Path, aux_root: str | pathlib.Path | None = None,
                 keep_checkpoints: bool = False, quiet: bool = False,
                 shared_root: str | pathlib.Path | None = None):
        super().__init__()
        self.root = pathlib.Path(root).absolute()
        self.aux_root = pathlib.Path(aux_root).absolute() if aux_root else None
        self.shared_root = pathlib.Path(shared_root).absolute() if shared_root else None
        self.keep_checkpoints = keep_checkpoints
        self.quiet = quiet
        self.trained_runs: list[tuple[str, int]] = []

    @staticmethod
    def is_shared(name: str) -> bool:
        """Whether a run name is independent of the target (it goes to `shared_root`): an
        auxiliary run (`aux/...`) or an auxiliary linear probe (`lp/<A>_notest`), with their
        files."""
        head, _, rest = name.partition("/")
        return head == "aux" or (head == "lp" and rest.partition("/")[0].endswith("_notest"))

    def path(self, name: str) -> pathlib.Path:
        head, _, rest = name.partition("/")
        if head == "aux" and self.aux_root is not None:
            return self.aux_root / rest
        if self.shared_root is not None and self.is_shared(name):
            return self.shared_root / name
        return self.root / name

    def done(self, name: str, fp: str) -> bool:
        marker = self.path(name) / "done.json"
        return marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fp

    def run(self, name, fp, info, train, keep=PARAMS):
        directory = self.path(name)
        directory.mkdir(parents=True, exist_ok=True)
        if self.done(name, fp):
            if self.quiet or not distributed.is_main_process():
                log.info("%s: done, loaded from %s", name, directory)
            else:
                Console(name).message(f"skipped: already done with the same inputs, loaded from "
                                      f"{directory}")
            return GroupResult.load(directory, info)
        if (directory / "done.json").exists():
            log.warning("%s: its inputs changed since it was trained (config, data or an earlier "
                        "stage); training it again", name)
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        result = train(directory, self.root / "tensorboard" / name)
        self.trained_members += len(result.best_score)
        self.trained_runs.append((name, len(result.best_score)))
        kept = PARAMS if self.keep_checkpoints else keep
        result.save(directory, kept)
        self.write_json(f"{name}/done.json", {"fingerprint": fp,
                                                "info": [m.to_dict() for m in result.info]})
        if not self.keep_checkpoints and distributed.is_main_process():
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)  # resume-only state
        distributed.barrier(f"pruned:{directory}")
        return result.keeping(kept)  # what a later load of the run gives

    def write_json(self, name: str, obj: Any) -> None:
        path = self.path(name)
        if distributed.is_main_process():
            write_json_atomic(path, obj)
        distributed.barrier(f"json:{path}")


# ---------------------------------------------------------------------------------------------
# One members run: the code path of every stage and of rat_jax.train
# ---------------------------------------------------------------------------------------------
def member_hparams(hparams_seeds: Sequence[int], trial_seed: int, dataset_name: str,
                   test_env: int, lr_scale: float = 1.0) -> list[dict]:
    """Per-member settings of runs h in `hparams_seeds` from the reference registry: the drawn
    lr (times `lr_scale`), weight decay and dropout, and the run seed (docs/protocol.md §1.2)."""
    out = []
    for h in hparams_seeds:
        hp = random_hparams(h, trial_seed)
        out.append({"lr": hp["lr"] * lr_scale, "weight_decay": hp["weight_decay"],
                    "resnet_dropout": hp["resnet_dropout"],
                    "seed": run_seed(dataset_name, test_env, h, trial_seed)})
    return out


def new_head(arch: str, num_classes: int, seed: int = 0) -> dict:
    """A fresh linear head for `arch`'s features with torch's nn.Linear default init (the
    reference's classifier init), as numpy {kernel [F, C], bias [C]}."""
    n = create_model(arch, num_classes).num_features
    init = torch_linear_init(n)
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"kernel": np.asarray(init(k1, (n, num_classes))),
            "bias": np.asarray(init(k2, (num_classes,)))}


def _eval_source(data: EvalSplit, batch_size: int, stream=None):
    """One eval set's batches as a callable of the evaluation step: with `stream` (an augmented
    set; the run's MemberStream) each member's own draw, seeded by its seed and `step`, so
    every evaluation point sees a fresh draw, the same in every run, after a resume and whatever
    members share the run, prepared as the training batches are (host or device augmentation);
    a clean set is shared by the members and ignores the step."""
    def batches(step: int | None = None):
        if stream is None:
            return data.batches(batch_size)
        return data.batches(batch_size, step=step, stream=stream)
    return batches


def eval_sets(dataset: DomainDataset, run: "GroupRun", settings: TrainSettings,
              stream, store: ImageStore | None = None) -> tuple[dict, dict]:
    """(eval_sets, final_sets) of a members run, streamed in `eval_batch_size` batches.
    eval_sets, at every evaluation point: the train envs' out splits (the ID-val score; with
    `validation_augment` each member's own augmented draw, as the reference); with
    `eval_all_splits` every env's in/out split (DomainBed's full records). final_sets, once
    after the run on each member's best and final params (lean records): the test envs' in/out
    splits. Every split is the rows selection reads (SplitSpec.of: the same evaluation cap).
    `stream`: the run's training stream (MemberStream: the members' seeds and augmentation)."""
    store = store or ImageStore(dataset, **settings.cache_kw())
    sets, final = {}, {}
    for env in range(dataset.num_envs):
        is_test = env in set(run.test_envs)
        for split in ("in", "out"):
            data = eval_split(dataset, SplitSpec.of(settings, trial_seed=run.trial, envs=[env],
                                                    split=split), store=store)
            augment = settings.validation_augment and not is_test
            source = _eval_source(data, settings.eval_batch_size, stream if augment else None)
            if settings.eval_all_splits or (not is_test and split == "out"):
                sets[f"env{env}_{split}"] = source
            elif is_test:
                final[f"env{env}_{split}"] = source
    return sets, final


@dataclasses.dataclass(frozen=True)
class GroupRun:
    """What one members run trains: the envs left out (`test_envs`), the split seed (`trial`),
    `steps` updates with an evaluation every `checkpoint_freq`; `classifier_only` for a linear
    probe; `stage`: its name on the console."""
    test_envs: Sequence[int]
    trial: int
    steps: int
    checkpoint_freq: int
    classifier_only: bool = False
    stage: str = "train"


def train_group(dataset: DomainDataset, inits: Sequence[Any],
                hparams: Sequence[MemberSpec | dict], batch_stats: Any, run: GroupRun,
                settings: TrainSettings, *, workdir=None, tensorboard=None) -> TrainResult:
    """Train len(inits) members together on `dataset` minus `run.test_envs` and return the
    engine's TrainResult. `hparams[i]`: member i's MemberSpec, or its flat dict (lr,
    weight_decay, resnet_dropout, seed (data stream and dropout), optional lp_steps (-1: whole
    net from update 0), optional init / group / h, and any other keys, which go into its
    records). `workdir`: records and resume checkpoints (None: in memory).
    With `settings.tensorboard`, per-member scalars go to `tensorboard` (default
    `workdir/tensorboard/`; none without either)."""
    if len(inits) != len(hparams):
        raise ValueError(f"{len(inits)} initial param trees but {len(hparams)} hparams")
    members = [MemberSpec.of(h) for h in hparams]
    train_envs = [i for i in range(dataset.num_envs) if i not in set(run.test_envs)]
    if not train_envs:
        raise ValueError(f"test_envs={list(run.test_envs)} leaves no training env of "
                         f"{dataset.name}")
    seeds = [m.seed for m in members]
    engine_hp = make_hparams(
        len(members), lr=[m.hparams["lr"] for m in members],
        weight_decay=[m.hparams["weight_decay"] for m in members],
        dropout=[m.hparams["resnet_dropout"] for m in members],
        lp_steps=[m.lp_steps for m in members], seed=seeds)
    loader = MemberLoader(dataset, train_envs, seeds, trial_seeds=run.trial,
                          spec=settings.stream_spec(), feed=FeedOptions(**settings.cache_kw()))
    sets, final_sets = eval_sets(dataset, run, settings, loader.stream, loader.store)
    per_step = settings.batch_size * len(train_envs)
    n_train = sum(len(dataset.samples[e]) for e in train_envs) * (1 - settings.holdout_fraction)
    loop = LoopConfig(run.steps, run.checkpoint_freq, eval_sets=sets, final_sets=final_sets,
                      val_names=[n for n in id_val_names(dataset.num_envs, run.test_envs)
                                 if n in sets],
                      save_minutes=settings.save_minutes, save_every=settings.save_every,
                      steps_per_epoch=n_train / per_step)
    output = RunOutput(workdir=workdir, member_info=_member_info(dataset, members, run, settings),
                       stage=run.stage, quiet=settings.quiet,
                       tensorboard_dir=_tensorboard_dir(settings, run, workdir, tensorboard))
    with loader:
        result = train_members(settings.model(dataset.num_classes), list(inits), batch_stats,
                               engine_hp, loader, loop, output,
                               settings.engine_config(per_step, run.classifier_only))
    runtime.release_memory()  # the run's engine, loader and compiler memory, before what follows
    return result


def _member_info(dataset, members: Sequence[MemberSpec], run: GroupRun,
                 settings: TrainSettings) -> list[dict]:
    """What each member's records carry beside the loop's fields."""
    return [{"hparams": m.record_hparams(), "init": m.init, "group": m.group,
             "args": _domainbed_args(dataset, run, i, m, settings)}
            for i, m in enumerate(members)]


def _tensorboard_dir(settings: TrainSettings, run: GroupRun, workdir, tensorboard):
    if not settings.tensorboard:
        return None
    board = tensorboard or (pathlib.Path(workdir) / "tensorboard" if workdir is not None
                            else None)
    if board is None:
        log.warning("%s: tensorboard=True but no workdir: no event files written", run.stage)
    return board


# DomainBed's `args.algorithm` per members group: the no-aux members are its ERM runs, so its
# collect_results / model_selection read them as such; the others are told apart.
ALGORITHMS = {"noaux": "ERM", "aux": "Ratatouille", "fusing": "Fusing"}


def _domainbed_args(dataset, run: GroupRun, index: int, member: MemberSpec,
                    settings: TrainSettings) -> dict:
    """The `args` of a DomainBed record (domainbed/scripts/train.py) for one member."""
    algorithm = "LinearProbe" if run.classifier_only else ALGORITHMS.get(member.group, "ERM")
    return {"dataset": dataset.name, "algorithm": algorithm, "test_envs": list(run.test_envs),
            "hparams_seed": int(index if member.h is None else member.h),
            "trial_seed": int(run.trial), "seed": member.seed,
            "holdout_fraction": settings.holdout_fraction, "hparams": dict(member.hparams)}


@dataclasses.dataclass(frozen=True)
class _Job:
    """A members run as a store keeps it: its name, fingerprint and the params kept."""
    name: str
    fp: str
    keep: Sequence[str]


def _run_group(store, job: _Job, dataset, inits, members: Sequence[MemberSpec], batch_stats,
               run: GroupRun, settings: TrainSettings) -> GroupResult:
    def train(directory, tensorboard):
        return GroupResult.from_train(train_group(dataset, inits, members, batch_stats, run,
                                                  settings, workdir=directory,
                                                  tensorboard=tensorboard), members)
    result = store.run(job.name, job.fp, members, train, keep=job.keep)
    runtime.release_memory()  # the run's host copies and the store's buffers
    return result


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Foundation:
    """The frozen start of every run: the foundation's featurizer params, its BatchNorm
    statistics (shared by every member) and its hash (part of every fingerprint)."""
    featurizer: Any
    batch_stats: Any
    hash: str = ""

    @classmethod
    def load(cls, source: str, arch: str, store_dir: pathlib.Path,
             image_size: int = 32) -> "Foundation":
        """`load_foundation`'s result as a Foundation."""
        featurizer, batch_stats, fhash = load_foundation(source, arch, store_dir, image_size)
        return cls(featurizer, batch_stats, fhash)


def linear_probe(dataset: DomainDataset, foundation: Foundation, *, test_envs: Sequence[int],
                 steps: int, settings: TrainSettings, checkpoint_freq: int | None = None,
                 store: MemoryStore | None = None, name: str | None = None) -> dict:
    """Classifier-only training of a fresh torch-initialized head on frozen foundation features
    (default hparams, seed 0, trial 0; docs/protocol.md §1.1); returns the best-ID-val network
    {"featurizer", "classifier"} (the reference's network_best)."""
    hp = dict(default_hparams(), seed=0, lp_steps=-1)
    hp["lr"] = hp["lr"] * settings.lr_scale
    member = MemberSpec(hp, init=FOUNDATION)
    head = new_head(settings.arch, dataset.num_classes, seed=0)
    name = name or f"{dataset.name}_test{'_'.join(map(str, test_envs)) or 'none'}"
    fp = fingerprint("lp", dataset.identity, list(test_envs), steps, foundation.hash,
                     settings.fingerprint())
    run = GroupRun(test_envs, 0, steps, checkpoint_freq or max(1, steps // 4),
                   classifier_only=True, stage=f"LP {name}")
    res = _run_group(store or MemoryStore(), _Job(f"lp/{name}", fp, ("best",)), dataset,
                     [{"featurizer": foundation.featurizer, "classifier": head}], [member],
                     foundation.batch_stats, run, settings)
    return trees.take(res.best_params, 0)


def leakage_guard(aux_name: str, aux: DomainDataset, target: DomainDataset) -> None:
    if aux.identity == target.identity or aux.root == target.root:
        raise ValueError(
            f"auxiliary dataset {aux_name!r} is the target dataset {target.name!r} "
            f"(identity {aux.identity}): an auxiliary task must not see the target. Remove it "
            f"from config.aux.")


def leakage_guard_manifest(manifest: Sequence[dict], target: DomainDataset) -> None:
    for entry in manifest:
        if entry.get("identity") == target.identity:
            raise ValueError(
                f"auxiliary checkpoint {entry['dataset']} run {entry['run']} was trained on "
                f"{entry['identity']}, which is the target dataset: refusing to use it as an "
                "initialization (leakage). Remove that run from the auxiliary pool.")


@dataclasses.dataclass(frozen=True)
class AuxTask:
    """One auxiliary dataset of the pool and its run lengths."""
    dataset: DomainDataset
    steps: int
    checkpoint_freq: int
    lp_steps: int = -1                    # first linear probe; -1 = `steps`


def aux_pool(tasks: Mapping[str, AuxTask], foundation: Foundation, *, target: DomainDataset,
             n_runs: int, settings: TrainSettings,
             store: MemoryStore | None = None) -> dict[str, AuxRuns]:
    """The auxiliary pool (docs/protocol.md §1.2): for each auxiliary dataset, a linear probe on
    all its domains, then `n_runs` fine-tunings from it (hparams h = 0..n_runs-1, trial 0).
    Returns {name: AuxRuns (the last featurizer of each run, fingerprint, manifest)}."""
    store = store or MemoryStore()
    return {name: aux_runs(name, tasks[name], foundation, target, n_runs, settings, store)
            for name in sorted(tasks)}


def aux_runs(name: str, task: AuxTask, foundation: Foundation, target: DomainDataset,
              n_runs: int, settings: TrainSettings, store: MemoryStore) -> AuxRuns:
    ds = task.dataset
    leakage_guard(name, ds, target)
    lp_steps = task.lp_steps if task.lp_steps > 0 else task.steps
    lp = linear_probe(ds, foundation, test_envs=[], steps=lp_steps, settings=settings,
                      checkpoint_freq=task.checkpoint_freq, store=store, name=f"{name}_notest")
    members = [MemberSpec(dict(member_hparams([h], 0, ds.name, -1, settings.lr_scale)[0],
                               lp_steps=-1), init=f"lp:{name}") for h in range(n_runs)]
    hps = [m.to_dict() for m in members]
    fp = fingerprint("aux", ds.identity, hps, task.steps, foundation.hash,
                     settings.fingerprint())
    run = GroupRun([], 0, task.steps, task.checkpoint_freq, stage=f"aux {name}")
    res = _run_group(store, _Job(f"aux/{name}_notest", fp, ("final",)), ds, [lp] * n_runs,
                     members, foundation.batch_stats, run, settings)
    manifest = [{"dataset": name, "identity": ds.identity, "run": r, "hparams": hps[r],
                 "foundation": foundation.hash, "nonfinite": bool(res.nonfinite[r])}
                for r in range(n_runs)]
    store.write_json(f"aux/{name}_notest/manifest.json", manifest)
    leakage_guard_manifest(manifest, target)
    return AuxRuns([trees.take(res.final_params, r)["featurizer"] for r in range(n_runs)],
                   fp, manifest)


def ratatouille_foundation_members(hs: Sequence[int], aux_names: Sequence[str],
                                   n_runs: int) -> list[int]:
    """Positions in `hs` of the runs the init rule starts from the foundation: Ratatouille's
    foundation-init members, which are the no-aux members with those h (docs/protocol.md §1.4.5)."""
    return [i for i, h in enumerate(hs)
            if aux_init_assignment(h, aux_names, n_runs) == "imagenet"]


@dataclasses.dataclass(frozen=True)
class TargetPlan:
    """What the target members of each (test env, trial) are made of: `n_hparams` runs per
    group from the auxiliary `pool` ({name: AuxRuns}, `n_runs` runs per dataset; the init rule
    aux_init_assignment), `lp_steps` classifier-only updates for the aux / fusing inits, `steps`
    updates with an evaluation every `checkpoint_freq`, and the fusing group (`run_fusing`,
    λ drawn over `fusing_range`)."""
    pool: Mapping[str, AuxRuns]
    n_hparams: int
    n_runs: int
    lp_steps: int
    steps: int
    checkpoint_freq: int
    run_fusing: bool = True
    fusing_range: float = 4.0


@dataclasses.dataclass
class _Members:
    """The target members being assembled: inits and specs, in order."""
    inits: list = dataclasses.field(default_factory=list)
    specs: list = dataclasses.field(default_factory=list)

    def add(self, featurizer, head, spec: MemberSpec) -> None:
        self.inits.append({"featurizer": featurizer, "classifier": head})
        self.specs.append(spec)


def target_members(target: DomainDataset, test_env: int, trial: int, w_lp: dict,
                   foundation: Foundation, plan: TargetPlan, *, settings: TrainSettings,
                   store: MemoryStore | None = None) -> dict:
    """The target members of one (test env, trial), trained as ONE members run (one compiled
    step; per-member inits, hparams and linear-probe schedules; docs/protocol.md §1.3-1.5):
      noaux   foundation init, whole net from step 0 (vanilla fine-tuning, soups). With the init
              rule's foundation runs they are also Ratatouille's foundation-init members;
      aux     runs the init rule starts from an auxiliary featurizer: `plan.lp_steps` + 1
              classifier-only updates, Adam reset, then the whole net;
      fusing  Σλ_j φ_j inits (§1.5) with the same linear-probe phase (when `plan.run_fusing`).
    Returns {group: GroupResult}."""
    members = _target_inits(target, test_env, trial, w_lp["classifier"], foundation, plan,
                            settings.lr_scale)
    names = sorted(plan.pool)
    fp = fingerprint("target", target.identity, test_env, trial,
                     [m.to_dict() for m in members.specs], foundation.hash,
                     [plan.pool[n].fingerprint for n in names], settings.fingerprint())
    run = f"{target.name}_test{test_env}_trial{trial}"
    group_run = GroupRun([test_env], trial, plan.steps, plan.checkpoint_freq,
                         stage=f"target env{test_env} trial{trial}")
    res = _run_group(store or MemoryStore(), _Job(f"target/{run}", fp, ("best",)), target,
                     members.inits, members.specs, foundation.batch_stats, group_run, settings)
    tags = [m.group for m in members.specs]
    return {tag: res.subset([i for i, t in enumerate(tags) if t == tag])
            for tag in dict.fromkeys(tags)}


def _target_inits(target: DomainDataset, test_env: int, trial: int, head, foundation: Foundation,
                  plan: TargetPlan, lr_scale: float) -> _Members:
    """The no-aux, aux-init and fusing members of one (test env, trial), in that order."""
    names = sorted(plan.pool)
    out = _Members()

    def spec(h, lp_steps, init, group):
        hp = member_hparams([h], trial, target.name, test_env, lr_scale)[0]
        return MemberSpec(dict(hp, lp_steps=lp_steps), init=init, group=group, h=h)
    for h in range(plan.n_hparams):
        out.add(foundation.featurizer, head, spec(h, -1, FOUNDATION, "noaux"))
    for h in range(plan.n_hparams):
        assignment = aux_init_assignment(h, names, plan.n_runs)
        if assignment == "imagenet":
            continue
        aux_name, r = assignment
        out.add(plan.pool[aux_name].featurizers[r], head,
                spec(h, plan.lp_steps, f"aux:{aux_name}/run{r}", "aux"))
    if plan.run_fusing and names:
        for h in range(plan.n_hparams):
            member = spec(h, plan.lp_steps, None, "fusing")
            candidates = [foundation.featurizer] + [plan.pool[n].featurizers[h % plan.n_runs]
                                                    for n in names]
            lam = soups.fusing_coefficients(member.seed, plan.fusing_range, len(candidates))
            out.add(trees.to_host(soups.fuse(candidates, lam)), head,
                    member.replace(init="fusing:" + ",".join(f"{x:.3f}" for x in lam)))
    return out
