"""Training of stacked members: pure single-member step, mesh, local strategies, engine, loop.

    from rat_jax.engine import EngineConfig, LoopConfig, RunOutput, make_hparams, train_members
    hp = make_hparams(M, lr=[...], weight_decay=[...], dropout=[...], lp_steps=[...], seed=[...])
    loop = LoopConfig(num_steps=5001, checkpoint_freq=100,
                      eval_sets={"env0_in": ..., "env0_out": ...},
                      val_names=id_val_names(num_envs, test_envs))
    result = train_members(model, [params_0, ..., params_{M-1}], batch_stats, hp, loader, loop,
                           RunOutput(workdir=run_dir), EngineConfig(batch_size=96))
    result.best_params, result.final_params, result.records

Modules: step.py (one member's update and evaluation), optim.py (torch Adam, LP schedule),
mesh.py (which devices hold which members), strategies.py (how members sharing a device run),
members.py (MemberEngine: compiled stacked steps; its parts in placement.py and programs.py),
feed.py (training batches placed on the devices ahead of their step), loop.py (evaluation,
records, checkpoints), resume.py (Orbax checkpoints), savepoints.py (when a run saves: wall-clock
period, SIGTERM), progress.py (the progress line). Stacked trees: rat_jax.trees.
"""
from rat_jax.engine.loop import (LoopConfig, RunOutput, TrainResult, evaluate, id_val_names,
                                 run_loop, train_members)
from rat_jax.engine.members import (EngineConfig, LiveMembers, MemberEngine, init_state,
                                    make_hparams)
from rat_jax.engine.mesh import plan_mesh
from rat_jax.engine.optim import torch_adam
from rat_jax.engine.progress import Progress
from rat_jax.engine.strategies import default_strategy

__all__ = ["EngineConfig", "LiveMembers", "LoopConfig", "MemberEngine", "RunOutput", "Progress", "TrainResult", "default_strategy",
           "evaluate", "id_val_names", "init_state", "make_hparams", "plan_mesh", "run_loop",
           "torch_adam", "train_members"]
