"""python -m rat_jax.convert --arch ARCH --torch PATH --out DIR [--num-classes C] [--force]

Reads a torch (zip or legacy) or safetensors checkpoint without torch and without executing
anything from it, converts it for rat_jax.models and writes an Orbax checkpoint with
rat_jax.checkpoint.save_pytree, metadata beside it (arch, source sha256, format, num_classes, ...).
"""
from __future__ import annotations

import argparse
import os
import sys

from rat_jax.files import sha256_file


def main(argv: list[str] | None = None) -> int:
    from rat_jax.convert.converter import convert_file_with_info, supported_archs
    from rat_jax.convert.reader import CheckpointFormatError

    archs = supported_archs()
    parser = argparse.ArgumentParser(
        prog="python -m rat_jax.convert",
        description="Convert a PyTorch checkpoint (torch.save zip/legacy, or safetensors) into an "
                    "Orbax checkpoint for rat_jax.models. torch is not needed and nothing in the "
                    "file is executed.")
    parser.add_argument("--arch", required=True, help=f"one of: {', '.join(archs)}")
    parser.add_argument("--torch", required=True, dest="torch_path", metavar="PATH",
                        help="state_dict file, or a DomainBed model_best.pkl / network_best.pkl / "
                             "featurizer_last.pkl")
    parser.add_argument("--out", required=True, help="output directory (Orbax checkpoint + metadata)")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size; for a featurizer-only file, initialise a fresh "
                             "torch-style head of this size (else the output has no classifier)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a fresh head (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = parser.parse_args(argv)

    if args.arch not in archs:
        parser.error(f"unknown --arch {args.arch!r}; valid archs: {', '.join(archs)}")
    if not os.path.isfile(args.torch_path):
        parser.error(f"--torch {args.torch_path!r}: no such file")
    try:
        variables, info = convert_file_with_info(args.torch_path, args.arch, args.num_classes,
                                                 seed=args.seed)
    except CheckpointFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from rat_jax import __version__
    from rat_jax.checkpoint import save_pytree

    metadata = dict(info)
    metadata.update({
        "source_file": os.path.abspath(args.torch_path),
        "source_sha256": sha256_file(args.torch_path),
        "converted_by": f"rat_jax {__version__} (rat_jax.convert)",
    })
    out = save_pytree(args.out, variables, metadata=metadata, force=args.force)
    n_params = sum(int(v.size) for v in _leaves(variables["params"]))
    print(f"wrote {out}: arch={info['arch']} classifier={info['classifier']} "
          f"num_classes={info['num_classes']} tensors={info['num_keys']} params={n_params:,} "
          f"format={info['source_format']}")
    return 0


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


if __name__ == "__main__":
    sys.exit(main())
