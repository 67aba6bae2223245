"""The members training loop: steps, evaluation and best-so-far selection, records, checkpoints.

DomainBed semantics (docs/protocol.md §3.5, §5, §7.16): evaluate after update `step` when
`step % checkpoint_freq == 0` (so step 0 is evaluated after its update) and at the last step; the
ID-validation score is the mean `out` accuracy over the training envs; a member's best params are
replaced only on a strict improvement. One DomainBed-style JSONL record per member per evaluation.

Inputs are duck-typed so this module does not depend on rat_jax.data:
  train_batches  an iterable of dict(images=float32 [M, N, H, W, C], labels=int32 [M, N]); if it
                 (or its iterator) has get_state()/set_state(), that state is checkpointed;
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
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

import rat_jax.distributed as distributed
import rat_jax.files as files
import rat_jax.trees as trees
from rat_jax.engine.members import MemberEngine, init_state
from rat_jax.engine.progress import Progress, ScalarWriter
from rat_jax.engine.resume import RunCheckpoints, decode_state, encode_state

RESULTS_FILE = "results.jsonl"


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
def _unpack(batch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if isinstance(batch, Mapping):
        images, labels, mask = batch["images"], batch["labels"], batch.get("mask")
    else:
        images, labels, *rest = batch
        mask = rest[0] if rest else None
    images, labels = np.asarray(images), np.asarray(labels)
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
    return images, labels, mask


def _pad_to(n: int, images, labels, mask):
    pad = n - labels.shape[0]
    if pad <= 0:
        return images, labels, mask
    return (np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)]),
            np.concatenate([labels, np.zeros((pad,), labels.dtype)]),
            np.concatenate([mask, np.zeros((pad,), bool)]))


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
            images, labels, mask = _unpack(batch)
            batch_size = max(batch_size, labels.shape[0])  # pad the ragged last batch: no recompile
            images, labels, mask = _pad_to(batch_size, images, labels, mask)
            counts.append(engine.evaluate_batch(params, images, labels, mask))
            total += int(mask.sum())
        counts = [distributed.to_host(c).astype(np.int64) for c in counts]
        correct = np.sum(counts, axis=0) if counts else 0
        accs[name] = (np.asarray(correct, np.float64) / total if total
                      else np.full((engine.num_members,), np.nan))
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


def run_loop(engine: MemberEngine, state: dict, hparams: dict, train_batches: Iterable, *,
             num_steps: int, checkpoint_freq: int, eval_sets: Mapping[str, Any] | None = None,
             val_names: Sequence[str] | None = None, workdir: str | os.PathLike | None = None,
             save_every: int | None = None, steps_per_epoch: float | None = None,
             member_info: Sequence[dict] | None = None, member_dirs: Sequence[str] | None = None,
             stage: str = "train", quiet: bool = False, progress_stream=None,
             progress_interval: float | None = None, max_to_keep: int = 1,
             async_checkpoints: bool = False, on_record: Callable[[int, dict], None] | None = None,
             tensorboard_dir: str | os.PathLike | None = None) -> TrainResult:
    """Train the engine's members for `num_steps` updates (resuming from `workdir` if it holds a
    checkpoint of this run), evaluating every `checkpoint_freq` steps. `state` / `hparams` are the
    stacked state and [M] settings (host or placed). Checkpoints every `save_every` steps (default
    `checkpoint_freq`) and at the end (`async_checkpoints`: write them in the background).
    Per-member results.jsonl go to `workdir/<member_dirs[i]>/` (default `member_<i>`);
    `member_info[i]` is merged into member i's records (its "hparams" replace the default ones;
    its "group" groups the console's evaluation lines). `tensorboard_dir`: per-member train loss
    and ID-val accuracy at each evaluation point as TensorBoard scalars (main process).
    Returns the final stacked state and per-member records.
    """
    m = engine.num_members
    eval_sets = dict(eval_sets or {})
    val_names = list(val_names or [])
    missing = [n for n in val_names if n not in eval_sets]
    if missing:
        raise ValueError(f"val_names {missing} are not among eval_sets {sorted(eval_sets)}")
    save_every = save_every or checkpoint_freq
    workdir = pathlib.Path(workdir).absolute() if workdir is not None else None
    writer = RecordWriter(m, workdir, member_dirs)
    hp_meta = _hparams_meta(hparams)
    state = engine.place(state)
    hparams_dev = engine.place(jax.tree.map(np.asarray, hparams))
    iterator = iter(train_batches)
    stateful = iterator if hasattr(iterator, "get_state") else (
        train_batches if hasattr(train_batches, "get_state") else None)

    loss_sum = np.zeros((m,), np.float64)
    time_sum, count, start = 0.0, 0, 0
    ckpts = (RunCheckpoints(workdir / "checkpoints", max_to_keep, async_checkpoints)
             if workdir is not None else None)
    latest = ckpts.latest_step() if ckpts is not None else None
    if latest is not None:
        state, meta = ckpts.restore(latest, state)
        if meta["hparams"] != hp_meta:
            raise ValueError(f"{workdir} holds a checkpoint of a run with other member settings "
                             f"({meta['hparams']}); use a new workdir or the same settings")
        if stateful is not None and meta.get("loader") is not None:
            stateful.set_state(decode_state(meta["loader"]))
        loss_sum = np.asarray(meta["loss_sum"], np.float64)
        time_sum, count, start = meta["time_sum"], meta["count"], latest + 1
    writer.load_until(latest if latest is not None else -1)

    per_step_images = None
    quiet = quiet or not distributed.is_main_process()
    progress = Progress(stage, num_steps, start=start, quiet=quiet, stream=progress_stream,
                        interval=progress_interval)
    groups = member_groups(m, member_info)
    names = list(member_dirs or [f"member_{i}" for i in range(m)])
    board = (ScalarWriter(tensorboard_dir)
             if tensorboard_dir is not None and distributed.is_main_process() else None)
    if start < num_steps:
        progress.message(f"{m} member{'s' if m > 1 else ''}, {num_steps} steps, evaluation every "
                         f"{checkpoint_freq}")
    if latest is not None:
        progress.message(f"resuming from the checkpoint of step {latest}: "
                         f"{start}/{num_steps} updates done")
    pending: list = []  # device losses not yet folded into loss_sum (no sync every step)
    last_losses = None

    def flush_losses():
        nonlocal loss_sum, last_losses
        for loss in pending:
            last_losses = distributed.to_host(loss).astype(np.float32)
            loss_sum = loss_sum + last_losses.astype(np.float64)
        pending.clear()

    # The live members train; their stacked state is asked for only where it is read
    # (evaluation, selection, checkpoints, the result).
    live = engine.start(state["members"], hparams_dev)
    state = {**state, "members": None}
    for step in range(start, num_steps):
        t0 = time.perf_counter()
        batch = next(iterator)
        if per_step_images is None:
            per_step_images = int(np.prod(np.shape(batch["labels"])))
        t_step = time.perf_counter()
        metrics = live.step(batch)
        if step == start:  # the first update compiles: timed alone, kept out of the ETA
            jax.block_until_ready(metrics["loss"])
            progress.compiled(time.perf_counter() - t_step)
        if pending:  # keep at most one step in flight
            jax.block_until_ready(pending[-1])
        pending.append(metrics["loss"])
        count += 1
        is_eval = step % checkpoint_freq == 0 or step == num_steps - 1
        is_save = ckpts is not None and ((step + 1) % save_every == 0 or step == num_steps - 1)
        if is_eval or is_save or progress.due():
            flush_losses()
        time_sum += time.perf_counter() - t0

        if is_eval or is_save:
            state = {**state, "members": live.stacked()}
        if is_eval:
            accs = evaluate(engine, live.params_for_eval(), eval_sets, step=step,
                            on_set=lambda k, n, name: progress.status(
                                f"step {step}: evaluating {name} ({k + 1}/{n})"))
            score = (np.mean([accs[n] for n in val_names], axis=0) if val_names
                     else np.full((m,), np.nan))
            # no validation splits: keep the latest evaluated params as "best"
            select = score if val_names else np.full((m,), float(step))
            state = engine.update_best(state, select, step)
            nonfinite = distributed.to_host(state["members"]["nonfinite"])
            for i in range(m):
                rec = {"step": step, "loss": _json_float(loss_sum[i] / count),
                       "step_time": time_sum / count, "member": i,
                       "score": _json_float(score[i]) if val_names else None,
                       "nonfinite": bool(nonfinite[i])}
                if steps_per_epoch:
                    rec["epoch"] = step / steps_per_epoch
                for name, acc in accs.items():
                    rec[f"{name}_acc"] = _json_float(acc[i])
                info = dict(member_info[i]) if member_info else {}
                rec["hparams"] = info.pop("hparams", None) or default_member_hparams(hparams, i)
                rec.update(info)
                writer.write(i, rec)
                if on_record is not None:
                    on_record(i, rec)
            mean_loss = loss_sum / max(count, 1)
            for text in eval_lines(step, groups, mean_loss, score if val_names else None,
                                   nonfinite):
                progress.message(text)
            if board is not None:
                values = {f"train_loss/{names[i]}": _json_float(mean_loss[i]) for i in range(m)}
                if val_names:
                    values.update({f"id_val_acc/{names[i]}": _json_float(score[i])
                                   for i in range(m)})
                board.scalars(step, values)
            loss_sum, time_sum, count = np.zeros((m,), np.float64), 0.0, 0

        if is_save:
            meta = {"step": step, "num_steps": num_steps, "hparams": hp_meta,
                    "loader": encode_state(stateful.get_state()) if stateful is not None else None,
                    "loss_sum": loss_sum.tolist(), "time_sum": time_sum, "count": count}
            ckpts.save(step, state, meta)
        state = {**state, "members": None}  # not kept while the live members train on
        if step == start:  # rate and ETA from here on: compilation and the first evaluation out
            progress.restart(step + 1)
        else:
            progress.update(step + 1, per_step_images or 0, last_losses)

    flush_losses()
    state = {**state, "members": live.stacked()}
    jax.block_until_ready(state)
    if ckpts is not None:
        ckpts.close()
    if board is not None:
        board.close()
    if start < num_steps:
        progress.close(num_steps, last_losses)
    return TrainResult(state=state, records=writer.records)


def train_members(model, params: Sequence[Any] | Any, batch_stats: Any, hparams: dict,
                  train_batches: Iterable, *, num_steps: int, checkpoint_freq: int,
                  batch_size: int | None = None, strategy: str | None = None,
                  devices: Sequence[jax.Device] | None = None, model_axis: int | None = None,
                  classifier_only: bool = False, remat: bool | str = False,
                  data_parallel: bool | None = None, cpu_ynn: str = "auto",
                  **loop_kwargs) -> TrainResult:
    """Train M members together and return stacked best/final params and per-member records.

    `params`: a list of M param trees (e.g. each from its own checkpoint) or one stacked tree.
    `batch_stats`: the frozen BN statistics shared by all members. `hparams`: from
    `members.make_hparams` ([M] lr, weight_decay, dropout, lp_steps, key). `batch_size`: images per
    member per step (lets the engine split each member's batch over spare devices; `data_parallel`
    None = by backend, see mesh.default_data_parallel). `strategy`: the local strategy (None = by
    backend, strategies.default_strategy). `cpu_ynn`: XLA:CPU's YNNPACK dot fusions, "auto" (by
    step cost), "on" or "off" (runtime.cpu_compiler_options).
    `classifier_only=True` is the linear-probe stage (featurizer never stepped). Other keyword
    arguments go to `run_loop` (eval_sets, val_names, workdir, save_every, quiet, ...).
    """
    stacked = trees.stack(list(params)) if isinstance(params, (list, tuple)) else params
    m = trees.num_members(stacked)
    engine = MemberEngine(model, batch_stats, m, batch_size=batch_size, devices=devices,
                          strategy=strategy, classifier_only=classifier_only, remat=remat,
                          model_axis=model_axis, data_parallel=data_parallel, cpu_ynn=cpu_ynn)
    state = init_state(stacked)
    if jax.process_count() > 1 and hasattr(train_batches, "load_only"):
        # each process decodes only the members whose batches live on its devices
        spec_shape = (m, batch_size or engine.data_size)
        local = distributed.process_indices(engine.mesh, engine.batch_spec, spec_shape)[0]
        train_batches.load_only(local)
    return run_loop(engine, state, hparams, train_batches, num_steps=num_steps,
                    checkpoint_freq=checkpoint_freq, **loop_kwargs)
