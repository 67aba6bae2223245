"""The members training loop: steps, evaluation and best-so-far selection, records, checkpoints.

DomainBed semantics (docs/protocol.md §3.5, §5, §7.16): evaluate after update `step` when
`step % checkpoint_freq == 0` (so step 0 is evaluated after its update) and at the last step; the
ID-validation score is the mean `out` accuracy over the training envs; a member's best params are
replaced only on a strict improvement. One DomainBed-style JSONL record per member per evaluation.

Inputs are duck-typed so this module does not depend on rat_jax.data:
  train_batches  an iterable of dict(images=float32 [M, N, H, W, C], labels=int32 [M, N]); if it
                 (or its iterator) has get_state()/set_state(), that state is checkpointed: the
                 position of the next batch a step reads, although its batches are placed on
                 the devices ahead of their step (engine.feed, EngineConfig.device_prefetch);
  eval_sets      {name: batches}, name like "env0_in"; batches is a re-iterable or a callable
                 returning an iterable of dict(images [B, H, W, C], labels [B]) (or tuples); the
                 images are shared by all members. A callable with a `step` parameter is called
                 with the evaluation step (augmented sets draw fresh augmentation per evaluation
                 point, seeded by the step), otherwise with no argument.

Console (main process, unless quiet): a header, a resume notice, `compiled in X s` after the first
update (the ETA counts from there), the live progress line, evaluation progress, and one line per
evaluation point and member group (train loss since the last evaluation, mean and best ID-val
accuracy, the best member). Optional TensorBoard scalars per member (`tensorboard_dir`).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

import rat_jax.distributed as distributed
import rat_jax.files as files
import rat_jax.runtime as runtime
import rat_jax.trees as trees
from rat_jax.engine import savepoints
from rat_jax.engine.members import EngineConfig, MemberEngine, init_state, init_state_shapes
from rat_jax.engine.progress import Progress, ScalarWriter
from rat_jax.engine.resume import RunCheckpoints, decode_state, encode_state
from rat_jax.engine.savepoints import Preempted, SavePoints

RESULTS_FILE = "results.jsonl"
EVAL_KEYS = ("params", "nonfinite")  # the members' entries an evaluation point reads


def id_val_names(num_envs: int, test_envs: Sequence[int]) -> list[str]:
    """Eval-set names whose accuracies average into the ID-val score: the train envs' out splits."""
    return [f"env{i}_out" for i in range(num_envs) if i not in set(test_envs)]


@dataclasses.dataclass
class TrainResult:
    """What a members run returns: the stacked state (on device) and per-member records."""
    state: dict
    records: list[list[dict]]

    @property
    def best_params(self) -> Any:
        return distributed.to_host(self.state["best_params"])

    @property
    def final_params(self) -> Any:
        return distributed.to_host(self.state["members"]["params"])

    @property
    def best_score(self) -> np.ndarray:
        return distributed.to_host(self.state["best_score"])

    @property
    def best_step(self) -> np.ndarray:
        return distributed.to_host(self.state["best_step"])

    @property
    def nonfinite(self) -> np.ndarray:
        return distributed.to_host(self.state["members"]["nonfinite"])


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def _unpack(batch) -> dict:
    """An eval batch (a dict, or a tuple (images, labels[, mask])) as a dict with a mask."""
    if isinstance(batch, Mapping):
        out = dict(batch)
    else:
        images, labels, *rest = batch
        out = {"images": images, "labels": labels, "mask": rest[0] if rest else None}
    out["images"], out["labels"] = np.asarray(out["images"]), np.asarray(out["labels"])
    mask = out.get("mask")
    out["mask"] = np.ones(out["labels"].shape, bool) if mask is None else np.asarray(mask, bool)
    return out


def _pad_to(n: int, batch: dict) -> dict:
    """Rows padded to `n` (mask off): the batch axis is the labels' last one (shared batches
    [B], per-member ones [M, B])."""
    axis = batch["labels"].ndim - 1
    pad = n - batch["labels"].shape[axis]
    if pad <= 0:
        return batch

    def grow(x):
        x = np.asarray(x)
        width = [(0, 0)] * x.ndim
        width[axis] = (0, pad)
        return np.pad(x, width)
    out = {k: grow(batch[k]) for k in ("images", "labels", "mask")}
    if batch.get("augment"):
        out["augment"] = jax.tree.map(grow, batch["augment"])
    return {**batch, **out}


def _takes_step(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "step" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _open_source(source, step: int | None):
    """An eval set's batches; a callable taking `step` is given the evaluation step."""
    if not callable(source):
        return source
    return source(step=step) if step is not None and _takes_step(source) else source()


def evaluate(engine: MemberEngine, params: Any, eval_sets: Mapping[str, Any],
             step: int | None = None,
             on_set: Callable[[int, int, str], None] | None = None) -> dict:
    """Accuracy [M] of every member on every eval set, in one pass over each set's images.
    `step`: the evaluation step, passed to sources that take it. `on_set(i, n, name)` is called
    before set i of n (progress)."""
    accs = {}
    batch_size = 0
    params = engine.prepare_eval(params)  # once for all batches
    for k, (name, source) in enumerate(eval_sets.items()):
        if on_set is not None:
            on_set(k, len(eval_sets), name)
        batches = _open_source(source, step)
        counts, total = [], 0
        for batch in batches:
            b = _unpack(batch)
            batch_size = max(batch_size, b["labels"].shape[-1])  # pad the ragged last batch
            b = _pad_to(batch_size, b)                            # (no recompile)
            counts.append(engine.evaluate_batch(params, b["images"], b["labels"], b["mask"],
                                                b.get("augment"), b.get("image_size")))
            total = total + b["mask"].sum(axis=-1)  # per member for per-member batches
        counts = [distributed.to_host(c).astype(np.int64) for c in counts]
        correct = np.sum(counts, axis=0) if counts else 0
        total = np.broadcast_to(np.asarray(total, np.float64), (engine.num_members,))
        with np.errstate(invalid="ignore", divide="ignore"):
            accs[name] = np.where(total > 0, np.asarray(correct, np.float64) / total, np.nan)
    return accs


# ----------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------
def _json_float(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def default_member_hparams(hparams: dict, i: int) -> dict:
    return {"lr": float(hparams["lr"][i]), "weight_decay": float(hparams["weight_decay"][i]),
            "resnet_dropout": float(hparams["dropout"][i]), "lp_steps": int(hparams["lp_steps"][i])}


class RecordWriter:
    """Per-member results.jsonl files (DomainBed layout: one folder per member) and in-memory lists."""

    def __init__(self, num_members: int, workdir: pathlib.Path | None,
                 member_dirs: Sequence[str] | None):
        self.records: list[list[dict]] = [[] for _ in range(num_members)]
        self.paths = None
        if workdir is not None and distributed.is_main_process():  # one writer per run
            names = member_dirs or [f"member_{i}" for i in range(num_members)]
            if len(names) != num_members:
                raise ValueError(f"member_dirs has {len(names)} names for {num_members} members")
            self.paths = [workdir / n / RESULTS_FILE for n in names]

    def load_until(self, last_step: int) -> None:
        """Keep records with step <= last_step (those covered by the checkpoint); drop the rest."""
        if self.paths is None:
            return
        for i, path in enumerate(self.paths):
            kept = []
            if path.exists():
                for line in path.read_text().splitlines():
                    if line.strip():
                        rec = json.loads(line)
                        if rec["step"] <= last_step:
                            kept.append(rec)
            self.records[i] = kept
            files.write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                  for r in kept))

    def write(self, i: int, record: dict) -> None:
        self.records[i].append(record)
        if self.paths is not None:
            with open(self.paths[i], "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def fill(self, i: int, step: int, values: dict) -> None:
        """Set `values` in member i's record of `step` (none: nothing to fill)."""
        for rec in self.records[i]:
            if rec["step"] == step:
                rec.update(values)

    def rewrite(self) -> None:
        """Write every member's records again (atomically), after `fill`."""
        if self.paths is not None:
            for path, recs in zip(self.paths, self.records):
                files.write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                      for r in recs))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def _hparams_meta(hparams: dict) -> dict:
    return {k: np.asarray(v).tolist() for k, v in hparams.items()}


def member_groups(num_members: int, member_info: Sequence[dict] | None) -> list:
    """[(group name or None, [member indices])] in order of first appearance (member_info's
    "group": e.g. noaux / aux / fusing in a target run)."""
    groups: dict = {}
    for i in range(num_members):
        g = member_info[i].get("group") if member_info else None
        groups.setdefault(g, []).append(i)
    return list(groups.items())


def eval_lines(step: int, groups, losses, score, nonfinite) -> list[str]:
    """One console line per member group at an evaluation point: the mean train loss since the
    last evaluation, the mean and best ID-val accuracy over the group's members (non-finite
    members left out) and the best member. `score` None: no ID-val splits."""
    out = []
    for name, idx in groups:
        idx = np.asarray(idx)
        label = f"{len(idx)} member{'s' if len(idx) > 1 else ''}"
        text = f"step {step}  " + (f"{name} ({label})" if name is not None else label)
        ok = idx[~np.asarray(nonfinite, bool)[idx]]
        loss = np.asarray(losses, np.float64)[ok]
        loss = loss[np.isfinite(loss)]
        text += f"  train loss {loss.mean():.4f}" if loss.size else "  train loss -"
        if score is not None:
            s = np.asarray(score, np.float64)[ok]
            fin = np.isfinite(s)
            if fin.any():
                best = int(ok[fin][np.argmax(s[fin])])
                text += (f"  ID-val mean {s[fin].mean():.4f} best {np.max(s[fin]):.4f} "
                         f"(member {best})")
            else:
                text += "  ID-val -"
        if len(ok) < len(idx):
            text += f"  ({len(idx) - len(ok)} non-finite)"
        out.append(text)
    return out


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """What a members run does: `num_steps` updates, an evaluation every `checkpoint_freq`
    steps (and at the last) of `eval_sets` ({name: batches}, see the module docstring), whose
    `val_names` average into the ID-val score; `final_sets` (same form) are evaluated once
    after the last step, on each member's best params and on its final params, and fill the
    records of its best step and of the last step (every record carries their keys, null
    elsewhere: DomainBed's readers find the test env's accuracy at the step they select).
    Resume checkpoints (rat_jax.engine.savepoints): every `save_minutes` of wall-clock time
    (`clock`, seconds: time.monotonic), every `save_every` steps when > 0, after the last step
    and on SIGTERM (then the run stops: `Preempted`, exit code 143); `max_to_keep` of them,
    written in the background (`async_checkpoints=False`: before the next step). `steps_per_epoch`
    adds an `epoch` to the records."""
    num_steps: int
    checkpoint_freq: int
    eval_sets: Mapping[str, Any] | None = None
    final_sets: Mapping[str, Any] | None = None
    val_names: Sequence[str] | None = None
    save_every: int | None = 0
    save_minutes: float | None = savepoints.SAVE_MINUTES
    steps_per_epoch: float | None = None
    max_to_keep: int = 1
    async_checkpoints: bool = True
    clock: Callable[[], float] = time.monotonic

    def replace(self, **changes) -> "LoopConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """Where a members run reports. `workdir`: per-member results.jsonl under
    `workdir/<member_dirs[i]>/` (default `member_<i>`) and the resume checkpoints (None: in
    memory); `member_info[i]` is merged into member i's records (its "hparams" replace the
    default ones; its "group" groups the console's evaluation lines); the console shows `stage`
    (unless `quiet`) on `progress_stream` every `progress_interval` s; `on_record(i, record)`
    sees every record; `tensorboard_dir`: per-member train loss and ID-val accuracy as
    TensorBoard scalars (main process)."""
    workdir: str | os.PathLike | None = None
    member_info: Sequence[dict] | None = None
    member_dirs: Sequence[str] | None = None
    stage: str = "train"
    quiet: bool = False
    progress_stream: Any = None
    progress_interval: float | None = None
    on_record: Callable[[int, dict], None] | None = None
    tensorboard_dir: str | os.PathLike | None = None

    def replace(self, **changes) -> "RunOutput":
        return dataclasses.replace(self, **changes)


class _Run:
    """The bookkeeping of one run_loop call: loss and time sums since the last evaluation,
    records, console, TensorBoard and checkpoints."""

    def __init__(self, engine: MemberEngine, hparams: dict, loop: LoopConfig, out: RunOutput):
        m = self.m = engine.num_members
        self.engine, self.hparams, self.loop, self.out = engine, hparams, loop, out
        self.eval_sets = dict(loop.eval_sets or {})
        self.final_sets = dict(loop.final_sets or {})
        self.val_names = list(loop.val_names or [])
        missing = [n for n in self.val_names if n not in self.eval_sets]
        if missing:
            raise ValueError(f"val_names {missing} are not among eval_sets "
                             f"{sorted(self.eval_sets)}")
        if loop.checkpoint_freq < 1:
            raise ValueError(f"checkpoint_freq={loop.checkpoint_freq}: the loop evaluates every "
                             "checkpoint_freq steps; give a period of at least 1 step")
        self.points = SavePoints(loop.num_steps, loop.save_minutes, loop.save_every, loop.clock,
                                 eval_every=loop.checkpoint_freq)
        self.workdir = pathlib.Path(out.workdir).absolute() if out.workdir is not None else None
        self.writer = RecordWriter(m, self.workdir, out.member_dirs)
        self.hp_meta = _hparams_meta(hparams)
        self.loss_sum = np.zeros((m,), np.float64)
        self.time_sum, self.count, self.start = 0.0, 0, 0
        self.ckpts = (RunCheckpoints(self.workdir / "checkpoints", loop.max_to_keep,
                                     loop.async_checkpoints)
                      if self.workdir is not None else None)
        self.groups = member_groups(m, out.member_info)
        self.names = list(out.member_dirs or [f"member_{i}" for i in range(m)])
        self.board = (ScalarWriter(out.tensorboard_dir)
                      if out.tensorboard_dir is not None and distributed.is_main_process()
                      else None)
        self.pending: list = []  # device losses not yet folded into loss_sum (no sync every step)
        self.last_losses = None
        self.progress = None

    def restore(self, state: dict, stateful) -> tuple[dict, int | None]:
        """Resume from the latest checkpoint, if any; returns (state, its step or None)."""
        latest = self.ckpts.latest_step() if self.ckpts is not None else None
        if latest is not None:
            state, meta = self.ckpts.restore(latest, state)
            if meta["hparams"] != self.hp_meta:
                raise ValueError(f"{self.workdir} holds a checkpoint of a run with other member "
                                 f"settings ({meta['hparams']}); use a new workdir or the same "
                                 "settings")
            if stateful is not None and meta.get("loader") is not None:
                stateful.set_state(decode_state(meta["loader"]))
            self.loss_sum = np.asarray(meta["loss_sum"], np.float64)
            self.time_sum, self.count, self.start = meta["time_sum"], meta["count"], latest + 1
        self.writer.load_until(latest if latest is not None else -1)
        return state, latest

    def open_console(self, latest: int | None) -> Progress:
        loop, m = self.loop, self.m
        quiet = self.out.quiet or not distributed.is_main_process()
        self.progress = Progress(self.out.stage, loop.num_steps, start=self.start, quiet=quiet,
                                 stream=self.out.progress_stream,
                                 interval=self.out.progress_interval)
        if self.start < loop.num_steps:
            self.progress.message(f"{m} member{'s' if m > 1 else ''}, {loop.num_steps} steps, "
                                  f"evaluation every {loop.checkpoint_freq}")
        if latest is not None:
            self.progress.message(f"resuming from the checkpoint of step {latest}: "
                                  f"{self.start}/{loop.num_steps} updates done")
        return self.progress

    def flush_losses(self) -> None:
        for loss in self.pending:
            self.last_losses = distributed.to_host(loss).astype(np.float32)
            self.loss_sum = self.loss_sum + self.last_losses.astype(np.float64)
        self.pending.clear()

    def evaluate(self, state: dict, live, step: int) -> dict:
        """Evaluate every set, keep the best params, write the records, console lines and
        scalars of evaluation point `step`; resets the sums."""
        m, val_names = self.m, self.val_names
        progress = self.progress
        accs = evaluate(self.engine, live.params_for_eval(), self.eval_sets, step=step,
                        on_set=lambda k, n, name: progress.status(
                            f"step {step}: evaluating {name} ({k + 1}/{n})"))
        score = (np.mean([accs[n] for n in val_names], axis=0) if val_names
                 else np.full((m,), np.nan))
        # no validation splits: keep the latest evaluated params as "best"
        select = score if val_names else np.full((m,), float(step))
        state = self.engine.update_best(state, select, step)
        nonfinite = distributed.to_host(state["members"]["nonfinite"])
        for i in range(m):
            self._record(i, step, accs, score, nonfinite)
        mean_loss = self.loss_sum / max(self.count, 1)
        for text in eval_lines(step, self.groups, mean_loss, score if val_names else None,
                               nonfinite):
            progress.message(text)
        if self.board is not None:
            values = {f"train_loss/{self.names[i]}": _json_float(mean_loss[i]) for i in range(m)}
            if val_names:
                values.update({f"id_val_acc/{self.names[i]}": _json_float(score[i])
                               for i in range(m)})
            self.board.scalars(step, values)
        self.loss_sum, self.time_sum, self.count = np.zeros((m,), np.float64), 0.0, 0
        return state

    def _record(self, i: int, step: int, accs: dict, score, nonfinite) -> None:
        rec = {"step": step, "loss": _json_float(self.loss_sum[i] / self.count),
               "step_time": self.time_sum / self.count, "member": i,
               "score": _json_float(score[i]) if self.val_names else None,
               "nonfinite": bool(nonfinite[i])}
        if self.loop.steps_per_epoch:
            rec["epoch"] = step / self.loop.steps_per_epoch
        for name in self.final_sets:            # filled after the run (fill_final)
            rec[f"{name}_acc"] = None
        for name, acc in accs.items():
            rec[f"{name}_acc"] = _json_float(acc[i])
        info = dict(self.out.member_info[i]) if self.out.member_info else {}
        rec["hparams"] = info.pop("hparams", None) or default_member_hparams(self.hparams, i)
        rec.update(info)
        self.writer.write(i, rec)
        if self.out.on_record is not None:
            self.out.on_record(i, rec)

    def fill_final(self, state: dict) -> None:
        """The final sets on the best and the final params, into the records of each member's
        best step and of the last step."""
        if not self.final_sets:
            return
        self.progress.status("evaluating the best and final params")
        best = evaluate(self.engine, state["best_params"], self.final_sets)
        final = evaluate(self.engine, state["members"]["params"], self.final_sets)
        best_step = distributed.to_host(state["best_step"])
        for i in range(self.m):
            for accs, step in ((final, self.loop.num_steps - 1), (best, int(best_step[i]))):
                self.writer.fill(i, step, {f"{n}_acc": _json_float(a[i])
                                           for n, a in accs.items()})
        self.writer.rewrite()

    def save(self, step: int, state: dict, stateful) -> None:
        meta = {"step": step, "num_steps": self.loop.num_steps, "hparams": self.hp_meta,
                "loader": encode_state(stateful.get_state()) if stateful is not None else None,
                "loss_sum": self.loss_sum.tolist(), "time_sum": self.time_sum,
                "count": self.count}
        # async: returns once the arrays are copied to host memory (resume.RunCheckpoints), so
        # the next step may donate the buffers it read
        self.ckpts.save(step, state, meta)
        self.points.saved(step)

    def stopped(self, step: int) -> None:
        """SIGTERM: wait for the checkpoint of `step`, say where it is, raise Preempted."""
        if self.ckpts is not None:
            self.ckpts.wait()
            # no process exits (a launcher may then stop the others) before all are past here
            distributed.barrier("rat_jax_sigterm_saved")
            where = (f"its checkpoint of step {step} is in {self.ckpts.directory}; rerun the "
                     "same command to resume from there")
        else:
            where = "it had no workdir, so it keeps no checkpoint"
        text = (f"[{self.out.stage}] SIGTERM: stopped after step {step} of "
                f"{self.loop.num_steps}; {where} (exit code {savepoints.EXIT_CODE})")
        if distributed.is_main_process():
            live_line = self.progress is not None and self.progress.tty and not self.progress.quiet
            print(("\n" if live_line else "") + text, file=sys.stderr, flush=True)
        raise Preempted(text)

    def close(self, finished: bool) -> None:
        """Wait for the saves in flight (also after an error); the last progress line when
        `finished`."""
        if self.ckpts is not None:
            self.ckpts.close()
        if self.board is not None:
            self.board.close()
        if finished and self.start < self.loop.num_steps:
            self.progress.close(self.loop.num_steps, self.last_losses)


@dataclasses.dataclass
class InitialState:
    """A run's initial state (init_state) from its members' params, made only once the train
    step is compiled and only when no checkpoint resumes the run: its host copies (params, Adam
    moments, best params) and the compiler's memory are not resident together."""
    params: Sequence[Any] | Any  # a list of M param trees or one stacked tree

    def shapes(self) -> dict:
        """init_state's shapes and dtypes (ShapeDtypeStructs), without making it."""
        p = self.params
        if isinstance(p, (list, tuple)):
            dtype = lambda x: x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
            p = jax.tree.map(lambda *xs: jax.ShapeDtypeStruct((len(xs),) + np.shape(xs[0]),
                                                              dtype(xs[0])), *p)
        return init_state_shapes(p)

    def make(self) -> dict:
        p = self.params
        return init_state(trees.stack(list(p)) if isinstance(p, (list, tuple)) else p)


def run_loop(engine: MemberEngine, state: dict, hparams: dict, train_batches: Iterable,
             loop: LoopConfig, output: RunOutput | None = None) -> TrainResult:
    """Train the engine's members for `loop.num_steps` updates (resuming from the output's
    workdir if it holds a checkpoint of this run), evaluating every `loop.checkpoint_freq`
    steps (LoopConfig, RunOutput). `state` / `hparams` are the stacked state (host or placed,
    or an InitialState) and [M] settings (host or placed). Returns the final stacked state and per-member records. A SIGTERM
    during the run stops it once a checkpoint is saved (`Preempted`, rat_jax.engine.savepoints).
    """
    run = _Run(engine, hparams, loop, output or RunOutput())
    finished = False
    initial = [state]  # _train takes the only reference: the state's host copies are freed
    del state          # once it is placed, not kept beside the live members for the run
    with savepoints.sigterm_guard():
        try:
            result = _train(run, engine, initial, hparams, train_batches)
            finished = True
        finally:
            run.close(finished)  # the run's end waits for its checkpoint to be on disk
        if run.points.stop_requested():  # SIGTERM after the last step's decision
            run.stopped(loop.num_steps - 1)
    return result


def _train(run: _Run, engine: MemberEngine, initial: list, hparams: dict,
           train_batches: Iterable) -> TrainResult:
    """The run; `initial`: [the initial state], emptied here (see run_loop)."""
    loop = run.loop
    host = initial.pop()  # the initial state, or the InitialState that makes it
    template = engine.parts.abstract(  # the placed state's shapes and shardings
        host.shapes() if isinstance(host, InitialState) else host)
    hparams_dev = engine.place(jax.tree.map(np.asarray, hparams))
    iterator = iter(train_batches)
    stateful = iterator if hasattr(iterator, "get_state") else (
        train_batches if hasattr(train_batches, "get_state") else None)
    state, latest = run.restore(template, stateful)  # a checkpoint's state, placed
    if latest is not None:
        host = None
    progress = run.open_console(latest)
    # Batches are placed on the devices while the step before them runs; checkpoints record the
    # feed's state (the next batch a step reads), not how far it has read ahead.
    feed = engine.feed(iterator, limit=max(loop.num_steps - run.start, 0), stateful=stateful)
    stateful = feed if stateful is not None else None
    # The train step is compiled on the first batch before a new run's state is placed, so the
    # compiler's memory and the members' state are not resident together.
    first, compile_seconds = None, 0.0
    if run.start < loop.num_steps:
        first = next(feed)
        t0 = time.perf_counter()
        engine.compile_train(template["members"], hparams_dev, first)
        compile_seconds = time.perf_counter() - t0
        runtime.trim_heap()  # the memory the compiler freed
    if host is not None:
        state = engine.place(host.make() if isinstance(host, InitialState) else host)
    del host, template
    per_step_images = None
    # The live members train; their stacked state is asked for only where it is read
    # (evaluation, selection, checkpoints, the result).
    live = engine.start(state["members"], hparams_dev)
    state = {**state, "members": None}
    runtime.trim_heap()  # the initial state's host copies, now placed
    for step in range(run.start, loop.num_steps):
        t0 = time.perf_counter()
        if first is not None:  # the batch the step was compiled on
            batch, first = first, None
        else:
            batch = next(feed)
        if per_step_images is None:
            per_step_images = batch.num_images
        t_step = time.perf_counter()
        metrics = live.step(batch)
        if step == run.start:  # compiling and the first update: timed alone, out of the ETA
            jax.block_until_ready(metrics["loss"])
            progress.compiled(compile_seconds + time.perf_counter() - t_step)
            runtime.trim_heap()  # the memory the first update freed
        if run.pending:  # keep at most one step in flight
            jax.block_until_ready(run.pending[-1])
        run.pending.append(metrics["loss"])
        run.count += 1
        is_eval = run.points.is_eval(step)
        due = run.points.at(step, progress.due())
        is_save = run.ckpts is not None and due.save
        if is_eval or is_save or due.flush:
            run.flush_losses()
        run.time_sum += time.perf_counter() - t0
        if is_eval or is_save:  # an evaluation alone reads the params and flags
            state = {**state, "members": live.stacked(None if is_save else EVAL_KEYS)}
        if is_eval:
            state = run.evaluate(state, live, step)
        if is_save:
            if is_eval:  # the evaluation's buffers, before the checkpoint's host copy
                runtime.trim_heap()
            run.save(step, state, stateful)
        state = {**state, "members": None}  # not kept while the live members train on
        if is_eval or is_save:  # the stacked copy, evaluation and checkpoint buffers are freed
            runtime.trim_heap()
        if due.stop:
            run.stopped(step)
        if step == run.start:  # rate and ETA from here on: compilation and first evaluation out
            progress.restart(step + 1)
        else:
            progress.update(step + 1, per_step_images or 0, run.last_losses)
    feed.close()
    run.flush_losses()
    if run.ckpts is not None:  # the last checkpoint's host copy is freed before the final
        run.ckpts.wait()       # state is joined and the final sets are evaluated
        runtime.trim_heap()
    state = {**state, "members": live.stacked()}
    del live  # its parts: the stacked state holds the members now (the final sets, the result)
    run.fill_final(state)
    jax.block_until_ready(state)
    return TrainResult(state=state, records=run.writer.records)


def train_members(model, params: Sequence[Any] | Any, batch_stats: Any, hparams: dict,
                  train_batches: Iterable, loop: LoopConfig, output: RunOutput | None = None,
                  engine: EngineConfig | None = None) -> TrainResult:
    """Train M members together and return stacked best/final params and per-member records.

    `params`: a list of M param trees (e.g. each from its own checkpoint) or one stacked tree.
    `batch_stats`: the frozen BN statistics shared by all members. `hparams`: from
    `members.make_hparams` ([M] lr, weight_decay, dropout, lp_steps, key). `loop` and `output`:
    as run_loop's. `engine`: the engine's placement and compilation (members.EngineConfig;
    `classifier_only=True` is the linear-probe stage, featurizer never stepped).
    """
    m = len(params) if isinstance(params, (list, tuple)) else trees.num_members(params)
    config = engine or EngineConfig()
    engine = MemberEngine(model, batch_stats, m, config)
    if jax.process_count() > 1 and hasattr(train_batches, "load_only"):
        # each process decodes only the members whose batches live on its devices
        spec_shape = (m, config.batch_size or engine.data_size)
        local = distributed.process_indices(engine.mesh, engine.batch_spec, spec_shape)[0]
        train_batches.load_only(local)
    # run_loop makes the initial state once the train step is compiled (InitialState) and holds
    # it alone, dropping it once placed: its host copies (stacked params, Adam state, best
    # params) neither meet the compiler's memory nor outlive the run's start.
    return run_loop(engine, InitialState(params), hparams, train_batches, loop, output)
