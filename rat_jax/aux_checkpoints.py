"""Bring your own auxiliary fine-tunings: `config.aux_checkpoints` as a ready auxiliary pool.

Each entry names one fine-tuned featurizer file and the dataset it was trained on:

    "runs/textures_run0.pth=textures"                     PATH=DATASET (what load_dataset takes)
    {"path": "model_best.pkl", "dataset": "VLCS", "root": "/data/domainbed"}
    {"path": "ckpt/", "identity": "textures:3f2a...", "name": "textures"}   no dataset at hand
    "exported/aux_checkpoints.json"                       the index `export_aux_pool` writes

Files: torch `.pth`/`.pt` (zip or legacy `torch.save`), DomainBed / Model Ratatouille `.pkl`
(`model_best.pkl`, `network_best.pkl`, `featurizer_last.pkl`, MR's saved featurizers),
`.safetensors`, and Orbax dirs (`export_flax`, `python -m rat_jax.convert`). They are read with
the torch-free reader of `rat_jax.convert` (nothing in a file is executed), mapped with the
converter's key map and checked against the foundation's own featurizer tree; a head in the file
is dropped (the target members use the target's linear probe head) and BatchNorm statistics are
not used (the members share the foundation's frozen statistics; a file whose statistics differ
from the foundation's is reported in a warning: it may come from another foundation).

The result has the shape of `stages.aux_pool`'s: {name: AuxRuns (featurizers, fingerprint,
manifest)}; runs are numbered in the order the entries are listed. Rules:
- name: the entry's `name`, else the dataset's name (the identity's part before ':'). Names must
  not collide with `config.aux` (that pool is trained); both may be used together.
- runs per name: every auxiliary dataset of the pool needs the same number of runs (the init rule
  `aux_init_assignment(h, names, n_runs)` takes one n_runs). With `config.aux` set, that is
  `config.n_aux_hparams`; with checkpoints only, the number of files per name (see `pool_runs`).
- leakage: an entry whose dataset (identity, folder or name) is the target's, or a file whose own
  metadata (DomainBed `args.dataset`, the safetensors metadata `export_aux_pool` writes) names the
  target, is refused (`stages.leakage_guard`, `stages.leakage_guard_manifest`).
- fingerprint: from the files' sha256 (not their paths): a changed file retrains the target runs.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import safetensors
from flax.traverse_util import flatten_dict, unflatten_dict

from rat_jax import stages
from rat_jax.convert.reader import (CheckpointFormatError, canonicalize_state_dict,
                                    detect_format, flatten_state_dict, load_torch_object)
from rat_jax.files import fingerprint, sha256_file, write_json_atomic
from rat_jax.specs import AuxRuns

log = logging.getLogger("rat_jax")

INDEX_FILE = "aux_checkpoints.json"
__all__ = ["INDEX_FILE", "PoolCheck", "export_aux_pool", "load_aux_checkpoints", "merge_pools",
           "parse_entries", "pool_runs"]

_FIELD = "config.aux_checkpoints"


# ---------------------------------------------------------------------------------------------
# Entries
# ---------------------------------------------------------------------------------------------
def parse_entries(entries: Sequence[Any]) -> list[dict]:
    """The entries of `config.aux_checkpoints` as dicts {path, dataset, root, identity, name}
    (exactly one of dataset / identity set). Accepts 'PATH=DATASET' strings, dicts or ConfigDicts,
    and the path of an index JSON written by `export_aux_pool` (its relative paths are relative to
    the JSON's folder)."""
    if isinstance(entries, (str, os.PathLike, Mapping)) or hasattr(entries, "to_dict"):
        entries = [entries]
    out = []
    for i, e in enumerate(entries or ()):
        if hasattr(e, "to_dict"):
            e = e.to_dict()
        if isinstance(e, os.PathLike):
            e = os.fspath(e)
        if isinstance(e, str):
            path, eq, ds = e.rpartition("=")
            if not eq and e.endswith(".json"):
                out += _read_index(e)
                continue
            if not eq or not path or not ds:
                raise ValueError(
                    f"{_FIELD}[{i}] = {e!r}: give the dataset the checkpoint was trained on, "
                    "as 'PATH=DATASET' (e.g. 'runs/textures_run0.pth=textures'), a dict "
                    "{'path': ..., 'dataset': ...} or {'path': ..., 'identity': ...}, or the "
                    f"{INDEX_FILE} that export_aux_pool writes.")
            e = {"path": path, "dataset": ds}
        if not isinstance(e, Mapping):
            raise ValueError(f"{_FIELD}[{i}] = {e!r}: an entry is 'PATH=DATASET', a dict or the "
                             f"path of an {INDEX_FILE} index")
        unknown = set(e) - {"path", "dataset", "root", "identity", "name"}
        if unknown:
            raise ValueError(f"{_FIELD}[{i}]: unknown keys {sorted(unknown)}; an entry has path, "
                             "dataset (with optional root) or identity, and optional name")
        path = os.fspath(e.get("path") or "")
        if not path:
            raise ValueError(f"{_FIELD}[{i}] = {dict(e)!r}: no 'path'")
        if bool(e.get("dataset")) == bool(e.get("identity")):
            raise ValueError(
                f"{_FIELD}[{i}] ({path}): give exactly one of 'dataset' (a name or folder that "
                "load_dataset resolves, to compute its identity) and 'identity' (the identity "
                "string of the dataset it was trained on, e.g. 'textures:3f2a...')")
        out.append({"path": path, "dataset": str(e.get("dataset") or ""),
                    "root": str(e.get("root") or ""), "identity": str(e.get("identity") or ""),
                    "name": str(e.get("name") or "")})
    return out


def _read_index(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{_FIELD}: index file {path} not found; pass the "
                                f"{INDEX_FILE} written by export_aux_pool, or the files themselves")
    try:
        items = json.loads(pathlib.Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{_FIELD}: index file {path} is not valid JSON ({err})") from None
    items = items.get("entries", items) if isinstance(items, Mapping) else items
    base = os.path.dirname(os.path.abspath(path))
    entries = parse_entries([{k: v for k, v in item.items() if k != "run"}
                             for item in items])
    for e in entries:
        if not os.path.isabs(e["path"]):
            e["path"] = os.path.join(base, e["path"])
    return entries


# ---------------------------------------------------------------------------------------------
# Reading one file
# ---------------------------------------------------------------------------------------------
class _Bad(Exception):
    """One bad file: the message names the problem and the fix (the caller adds the file)."""


def _safetensors_metadata(path: str) -> dict:
    with safetensors.safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})


def _file_provenance(obj: Any, meta: Mapping[str, str]) -> dict:
    """What a file says about the data it was trained on: DomainBed's pickled `args` (dataset,
    test_envs) or the safetensors metadata export_aux_pool writes."""
    out = {}
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, Mapping) and isinstance(args.get("dataset"), str):
        out["dataset"] = args["dataset"]
        if args.get("test_envs") is not None:
            out["test_envs"] = list(args["test_envs"])
    for key in ("identity", "dataset", "foundation"):
        if meta.get(key):
            out[key] = str(meta[key])
    return out


def _read_torch(path: str) -> tuple[dict, dict, str]:
    """{flax path: array} (converter key map) of a torch / safetensors file, its provenance and
    its container format."""
    from rat_jax.convert.converter import torch_key_to_flax
    fmt = detect_format(path)
    obj = load_torch_object(path)
    meta = _safetensors_metadata(path) if fmt == "safetensors" else {}
    sd = canonicalize_state_dict(flatten_state_dict(obj))
    converted = {}
    for key, value in sd.items():
        flax_path, arr = torch_key_to_flax(key, value)
        converted[tuple(flax_path)] = (key, np.asarray(arr))
    return converted, _file_provenance(obj, meta), fmt


def _read_orbax(path: str, arch: str) -> tuple[dict, dict, str]:
    from rat_jax import checkpoint
    if not os.path.isdir(os.path.join(path, "state")):
        raise _Bad("a directory, but not an Orbax checkpoint written by rat_jax (no state/ "
                   "folder). Fix: pass a torch/safetensors file or a folder written by "
                   "export_flax / `python -m rat_jax.convert`.")
    meta = checkpoint.load_metadata(path)
    if meta.get("arch") not in (None, arch):
        raise _Bad(f"an Orbax checkpoint of arch {meta['arch']!r}, but this run's foundation is "
                   f"{arch!r}. Fix: use fine-tunings of the run's foundation (config.arch).")
    try:
        tree = checkpoint.restore_pytree(path)
    except Exception as err:  # orbax raises many types for a damaged folder
        raise _Bad(f"unreadable Orbax checkpoint ({type(err).__name__}: {str(err)[:300]}). "
                   "Fix: copy the folder again or re-export it.") from None
    if not isinstance(tree, Mapping):
        raise _Bad("the Orbax checkpoint does not hold a parameter tree")
    params = tree.get("params", tree)
    featurizer = params.get("featurizer") if isinstance(params, Mapping) else None
    if not isinstance(featurizer, Mapping):
        raise _Bad(f"the Orbax checkpoint has no featurizer (top-level keys {sorted(tree)}); "
                   "expected {'params': {'featurizer': ...}, 'batch_stats': ...}")
    converted = {("params", "featurizer") + k: ("/".join(k), np.asarray(v))
                 for k, v in flatten_dict(featurizer).items()}
    stats = tree.get("batch_stats")
    if isinstance(stats, Mapping):
        converted.update({("batch_stats",) + k: ("/".join(k), np.asarray(v))
                          for k, v in flatten_dict(stats).items()})
    if isinstance(params.get("classifier"), Mapping):
        converted.update({("params", "classifier") + k: ("classifier/" + "/".join(k),
                                                         np.asarray(v))
                          for k, v in flatten_dict(params["classifier"]).items()})
    prov = {k: str(meta[k]) for k in ("identity", "dataset", "foundation") if meta.get(k)}
    return converted, prov, "orbax"


def _check(converted: dict, arch: str, foundation_featurizer, foundation_batch_stats):
    """The featurizer params of `converted`, checked against the foundation's tree; and whether
    the file's BN statistics equal the foundation's (None: the file has none)."""
    want = {("params", "featurizer") + k: np.shape(v)
            for k, v in flatten_dict(foundation_featurizer).items()}
    want_stats = ({("batch_stats",) + k: np.shape(v)
                   for k, v in flatten_dict(foundation_batch_stats).items()}
                  if foundation_batch_stats is not None else None)
    got = {p: v for p, v in converted.items() if p[:2] != ("params", "classifier")}
    missing = [p for p in want if p not in got]
    extra = [p for p in got if p not in want
             and not (p[0] == "batch_stats" and (want_stats is None or p in want_stats))]
    mismatch = [(p, got[p][1].shape, want[p]) for p in want
                if p in got and tuple(got[p][1].shape) != tuple(want[p])]
    if want_stats:
        mismatch += [(p, got[p][1].shape, want_stats[p]) for p in want_stats
                     if p in got and tuple(got[p][1].shape) != tuple(want_stats[p])]
    if missing or extra or mismatch:
        fmt = "/".join
        stats = f" + {len(want_stats)} BatchNorm statistics" if want_stats else ""
        msg = [f"does not match the foundation's architecture {arch!r} ({len(got)} featurizer "
               f"tensors in the file, {len(want)} parameters{stats} expected)"]
        if missing:
            msg.append(f"{len(missing)} missing keys, e.g. "
                       + ", ".join(fmt(p[1:]) for p in missing[:4]))
        if extra:
            msg.append(f"{len(extra)} extra keys, e.g. "
                       + ", ".join(f"{got[p][0]}" for p in extra[:4]))
        if mismatch:
            p, shape, exp = mismatch[0]
            msg.append(f"{len(mismatch)} wrong shapes, e.g. {got[p][0]} (-> {fmt(p[1:])}) has "
                       f"{tuple(shape)} in Flax layout, the foundation has {tuple(exp)}")
        guess = _guess_arch(converted, arch)
        hint = f"; its tensors match arch {guess!r}" if guess else ""
        raise _Bad("; ".join(msg) + f". Fix: use fine-tunings of this run's foundation "
                   f"(config.arch={arch!r}, the same foundation weights){hint}.")
    featurizer = unflatten_dict({p[2:]: np.ascontiguousarray(got[p][1], np.float32)
                          for p in want})
    bad = [got[p][0] for p in want if not np.isfinite(got[p][1]).all()]
    if bad:
        raise _Bad(f"{len(bad)} tensors hold NaN or inf values, e.g. {', '.join(bad[:3])}: the "
                   "fine-tuning diverged. Fix: use another run (or its best checkpoint).")
    stats_match = None
    if want_stats and any(p in got for p in want_stats):
        stats_match = all(p in got and np.array_equal(got[p][1], np.asarray(v))
                          for p, v in ((("batch_stats",) + k, v) for k, v
                                       in flatten_dict(foundation_batch_stats).items()))
    return featurizer, stats_match


def _guess_arch(converted: dict, arch: str) -> str | None:
    try:
        from rat_jax.convert.converter import _guess_arch as guess
        return guess({p: v for p, (_, v) in converted.items()}, arch)
    except Exception:  # a guess must not hide the real error
        return None


def _read_one(entry: dict, arch: str, foundation_featurizer, foundation_batch_stats):
    path = entry["path"]
    try:
        if os.path.isdir(path):
            converted, prov, fmt = _read_orbax(path, arch)
        else:
            converted, prov, fmt = _read_torch(path)
    except CheckpointFormatError as err:
        text = str(err)
        if text.startswith(path):
            text = text[len(path):].lstrip(": ")
        text = text.rstrip(". ")
        if any(w in text for w in ("truncated", "corrupt", "no data", "malformed")):
            raise _Bad(f"unreadable file: {text}. Fix: copy the file again (or re-save it); a "
                       "partial download or copy is the usual cause.") from None
        raise _Bad(f"unknown or unsupported format: {text}. Fix: pass a torch.save state_dict "
                   "(.pth/.pt), a DomainBed/Model Ratatouille .pkl, a .safetensors file or an "
                   "Orbax dir.") from None
    except (OSError, ValueError) as err:
        raise _Bad(f"unreadable file ({type(err).__name__}: {err}). Fix: copy it again or "
                   "re-save it.") from None
    featurizer, stats_match = _check(converted, arch, foundation_featurizer,
                                     foundation_batch_stats)
    head = converted.get(("params", "classifier", "bias"))
    return featurizer, {"format": fmt, "provenance": prov, "batch_stats_match": stats_match,
                        "head_dropped": None if head is None else int(head[1].shape[-1])}


# ---------------------------------------------------------------------------------------------
# Leakage
# ---------------------------------------------------------------------------------------------
def _name_of(identity: str) -> str:
    return identity.partition(":")[0]


def _same_name(a: str, b: str) -> bool:
    norm = lambda s: s.lower().replace("_", "").replace("-", "")  # noqa: E731
    return bool(a) and norm(a) == norm(b)


def _leakage(entry: dict, name: str, identity: str, dataset, prov: dict, target) -> None:
    """Refuse a checkpoint trained on the target: the stages' guards (identity, folder), the
    dataset's name, and what the file itself says it was trained on."""
    why = None
    try:
        if dataset is not None:
            stages.leakage_guard(name, dataset, target)
        stages.leakage_guard_manifest([{"dataset": name, "run": entry["path"],
                                        "identity": identity}], target)
    except ValueError:
        why = f"trained on {identity!r} (the entry's dataset)"
    if why is None and _same_name(_name_of(identity), target.name):
        why = f"trained on {identity!r} (the entry's dataset), which has the target's name"
    for key in ("identity", "dataset"):
        said = prov.get(key)
        if why is None and said and (said == target.identity
                                     or _same_name(_name_of(said), target.name)):
            why = f"trained on {said!r} (the file's own metadata, {key})"
    if why:
        raise _Bad(f"leakage: {why}, the target dataset {target.name!r} ({target.identity}); "
                   "an auxiliary initialization must not have seen the target. Fix: remove it "
                   f"from {_FIELD}.")


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PoolCheck:
    """What every auxiliary checkpoint is checked against: the run's `arch` and `foundation`
    (its featurizer tree and BatchNorm statistics; its hash goes into the fingerprints), the
    `target` (leakage), `n_runs`: the files required per name (the trained pool's count when
    `config.aux` is also used; None: any count, equal for every name), and `reserved_names`:
    names already in the pool (`config.aux`)."""
    arch: str
    foundation: stages.Foundation
    target: Any
    n_runs: int | None = None
    reserved_names: Sequence[str] = ()


@dataclasses.dataclass
class _Run:
    """One checked file of the pool."""
    entry: dict
    identity: str
    featurizer: Any
    digest: str
    info: dict


def load_aux_checkpoints(entries: Sequence[Any], check: PoolCheck, *,
                         resolve_dataset: Callable[[str, str | None], Any] | None = None,
                         store: stages.MemoryStore | None = None) -> dict[str, AuxRuns]:
    """The auxiliary pool of `entries` (see the module docstring and `parse_entries`), as
    `stages.aux_pool` returns it: {name: AuxRuns (run r's featurizer params, fingerprint,
    manifest)}, the manifest per run: dataset, identity, run, path, sha256, format, foundation,
    provenance.

    Every file is checked against `check` (missing first: FileNotFoundError; then unreadable,
    other arch, leakage: one ValueError with one line per bad file).
    `resolve_dataset(dataset, root)`: how an entry's dataset is loaded (default
    `rat_jax.data.load_dataset`). `store`: where the manifests go
    (`aux_checkpoints/<name>/manifest.json` under a WorkdirStore's root)."""
    entries = parse_entries(entries)
    if not entries:
        return {}
    missing = [e["path"] for e in entries if not os.path.exists(e["path"])]
    if missing:
        raise FileNotFoundError(
            f"{_FIELD}: no such file or directory: {', '.join(missing)}. Fix: correct the "
            "path(s) (relative paths are relative to the working directory).")
    reader = _Reader(check, resolve_dataset)
    problems, runs = [], {}
    for e in entries:
        try:
            name, run = reader.read(e)
        except _Bad as bad:
            problems.append(f"  {e['path']}: {bad}")
            continue
        runs.setdefault(name, []).append(run)
    if problems:
        raise ValueError(f"{_FIELD}: {len(problems)} bad auxiliary checkpoint(s):\n"
                         + "\n".join(problems))
    _check_counts({n: len(r) for n, r in runs.items()}, check.n_runs)
    store = store or stages.MemoryStore()
    return {name: _aux_runs(name, runs[name], check, store) for name in sorted(runs)}


class _Reader:
    """Reads and checks one entry after another: datasets resolved once, duplicates refused."""

    def __init__(self, check: PoolCheck, resolve_dataset=None):
        if resolve_dataset is None:
            from rat_jax.data import load_dataset

            def resolve_dataset(name, root):
                return load_dataset(name, root or None)
        self.check, self.resolve_dataset = check, resolve_dataset
        self.datasets: dict[tuple, Any] = {}
        self.seen_sha: dict[str, str] = {}

    def dataset(self, e: dict):
        key = (e["dataset"], e["root"])
        if key not in self.datasets:
            try:
                self.datasets[key] = self.resolve_dataset(e["dataset"], e["root"] or None)
            except (ValueError, OSError) as err:
                raise _Bad(f"its dataset {e['dataset']!r} cannot be loaded ({err}). "
                           "Fix: give the dataset's name/folder (and root), or its "
                           "identity string as {'path', 'identity'}.") from None
        return self.datasets[key]

    def read(self, e: dict) -> tuple[str, _Run]:
        """(the pool name, the checked run) of entry `e`; _Bad when it cannot be used."""
        check, path = self.check, e["path"]
        dataset = self.dataset(e) if e["dataset"] else None
        if dataset is not None:
            identity, name = dataset.identity, e["name"] or dataset.name
        else:
            identity, name = e["identity"], e["name"] or _name_of(e["identity"])
        if name in check.reserved_names:
            raise _Bad(f"its name {name!r} is also a trained auxiliary dataset of config.aux. "
                       "Fix: give the entry another 'name', or drop it from config.aux.")
        if dataset is not None:  # the cheap leakage check before reading the file
            _leakage(e, name, identity, dataset, {}, check.target)
        featurizer, info = _read_one(e, check.arch, check.foundation.featurizer,
                                     check.foundation.batch_stats)
        _leakage(e, name, identity, dataset, info["provenance"], check.target)
        digest = sha256_file(path) if os.path.isfile(path) else _dir_sha256(path)
        if digest in self.seen_sha:
            raise _Bad(f"the same content as {self.seen_sha[digest]} (sha256 {digest[:12]}): "
                       "each run must be its own fine-tuning. Fix: list it once.")
        self.seen_sha[digest] = path
        _warn(path, identity, info)
        return name, _Run(e, identity, featurizer, digest, info)


def _warn(path: str, identity: str, info: dict) -> None:
    if info["batch_stats_match"] is False:
        log.warning("aux checkpoint %s: its BatchNorm statistics differ from the "
                    "foundation's; they are not used (members share the foundation's frozen "
                    "statistics), but the file may be a fine-tuning of another foundation",
                    path)
    file_ds = info["provenance"].get("identity")
    if file_ds and file_ds != identity:
        log.warning("aux checkpoint %s: its metadata says it was trained on %s, the entry "
                    "says %s", path, file_ds, identity)


def _check_counts(counts: dict, n_runs: int | None) -> None:
    if n_runs is not None and any(c != n_runs for c in counts.values()):
        raise ValueError(
            f"{_FIELD}: files per auxiliary dataset {counts}, but the trained pool (config.aux) "
            f"has config.n_aux_hparams={n_runs} runs per dataset and the init rule takes one run "
            f"count for all. Fix: give {n_runs} files per dataset, or set "
            "config.n_aux_hparams to the number of files.")
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"{_FIELD}: files per auxiliary dataset {counts} differ; the init rule "
            "(aux_init_assignment(h, names, n_runs)) takes one run count for every dataset. "
            "Fix: give each dataset the same number of files.")


def _aux_runs(name: str, runs: Sequence[_Run], check: PoolCheck, store) -> AuxRuns:
    fhash = check.foundation.hash
    manifest = [{"dataset": name, "identity": run.identity, "run": r,
                 "path": os.path.abspath(run.entry["path"]), "sha256": run.digest,
                 "format": run.info["format"], "foundation": fhash,
                 "source": "checkpoint", "provenance": run.info["provenance"],
                 "batch_stats_match_foundation": run.info["batch_stats_match"],
                 "head_dropped": run.info["head_dropped"], "nonfinite": False}
                for r, run in enumerate(runs)]
    stages.leakage_guard_manifest(manifest, check.target)
    fp = fingerprint("aux-checkpoints", [(m["identity"], m["sha256"]) for m in manifest], fhash)
    store.write_json(f"aux_checkpoints/{name}/manifest.json", manifest)
    log.info("aux checkpoints %s: %d runs (%s)", name, len(manifest),
             ", ".join(m["path"] for m in manifest))
    return AuxRuns([run.featurizer for run in runs], fp, manifest)


def _dir_sha256(path: str) -> str:
    """sha256 over an Orbax folder's files (relative names and contents)."""
    import hashlib
    h = hashlib.sha256()
    for p in sorted(pathlib.Path(path).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def merge_pools(trained: Mapping[str, AuxRuns],
                checkpoints: Mapping[str, AuxRuns]) -> dict[str, AuxRuns]:
    """One pool from the trained one (`config.aux`) and the checkpoints' (names must differ)."""
    both = sorted(set(trained) & set(checkpoints))
    if both:
        raise ValueError(f"auxiliary datasets {both} are both in config.aux (trained) and in "
                         f"{_FIELD}; give the checkpoints another 'name' or drop one of them")
    return {**trained, **checkpoints}


def pool_runs(pool: Mapping[str, AuxRuns], default: int) -> int:
    """The run count of the pool's datasets (the init rule's n_runs): equal for every dataset;
    `default` (config.n_aux_hparams) for an empty pool."""
    counts = {n: p.n_runs for n, p in pool.items()}
    if not counts:
        return default
    if len(set(counts.values())) > 1:
        raise ValueError(f"auxiliary pool runs per dataset differ: {counts}; the init rule takes "
                         "one run count for every dataset (config.n_aux_hparams and the number of "
                         f"files per dataset in {_FIELD} must agree)")
    return next(iter(counts.values()))


# ---------------------------------------------------------------------------------------------
# Export: a trained pool as files that load_aux_checkpoints (and torch) read
# ---------------------------------------------------------------------------------------------
def export_aux_pool(pool: Mapping[str, AuxRuns], arch: str, directory: str | os.PathLike, *,
                    batch_stats: Any = None, format: str = "safetensors") -> list[dict]:
    """Write every featurizer of `pool` (as `stages.aux_pool` returns it) as a torch-layout file
    `directory/<name>_run<r>.safetensors` (or `.pth` with format='pth', which needs torch), with
    `batch_stats` (the foundation's; without them the files hold the parameters only and torch's
    strict `load_state_dict` refuses them). Safetensors files carry the run's name, dataset
    identity, run and foundation hash as metadata. Also writes `directory/aux_checkpoints.json`,
    an index usable as `config.aux_checkpoints`. Returns the entries ({path, identity, name})."""
    from rat_jax import distributed
    from rat_jax.export import export_torch, to_torch_state_dict, torch_layout, write_safetensors
    if format not in ("safetensors", "pth"):
        raise ValueError(f"export_aux_pool: format={format!r}; use 'safetensors' or 'pth'")
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in sorted(pool):
        manifest = pool[name].manifest
        for r, featurizer in enumerate(pool[name].featurizers):
            m = manifest[r] if r < len(manifest) else {}
            identity = m.get("identity") or name
            variables = {"params": {"featurizer": featurizer},
                         "batch_stats": batch_stats if batch_stats is not None else {}}
            path = directory / f"{name}_run{r}.{format}"
            if distributed.is_main_process():
                if format == "pth":
                    export_torch(path, variables, arch, format="pth")
                else:
                    write_safetensors(path, to_torch_state_dict(variables, arch), {
                        "format": "pt", "arch": arch, "layout": torch_layout(arch),
                        "name": name, "identity": identity, "run": str(r),
                        "foundation": str(m.get("foundation", ""))})
            entries.append({"path": path.name, "identity": identity, "name": name, "run": r})
    if distributed.is_main_process():
        write_json_atomic(directory / INDEX_FILE, entries)
    distributed.barrier(f"export_aux_pool:{directory}")
    return [dict(e, path=str(directory / e["path"])) for e in entries]
