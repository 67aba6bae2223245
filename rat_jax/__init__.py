"""rat_jax: Model Ratatouille in JAX/Flax.

The functional API (`rat_jax.api`) is importable from here: `import rat_jax as rj; rj.train(...)`.
Its names load on first use, so `import rat_jax.runtime` (process set-up that must run before JAX
starts) does not import JAX. The training engine is the subpackage `rat_jax.engine`.
"""
__version__ = "0.1.0"

__all__ = [
    "accuracy", "aux_init_assignment", "aux_pool", "AuxTask", "average", "barrier",
    "build_demo_datasets", "concatenate", "convert_torch_checkpoint", "create_model", "dataset",
    "diagnostic_figures", "diversity", "ensemble", "ensemble_logits", "evaluate",
    "evaluate_members", "export_flax", "export_torch", "foundation", "fuse",
    "fusing_coefficients", "greedy_soup", "id_val_names", "interpolate", "linear_probe",
    "lmc_curve", "lmc_gate", "load_foundation", "load_split", "member_hparams", "new_head",
    "predict_logits", "predict_logits_stacked", "random_hparams", "read_torch_file", "run_seed",
    "seed_hash", "select", "select_and_evaluate", "split_indices", "stack", "take",
    "target_members", "train", "TrainResult", "TrainSettings",
]


def __getattr__(name):
    if name in __all__:
        from rat_jax import api
        return getattr(api, name)
    raise AttributeError(f"module 'rat_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
