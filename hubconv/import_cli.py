"""`hubconv import`: the command line of `hubconv.importer`."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `import` subcommand on hubconv's CLI."""
    p = sub.add_parser(
        "import",
        help="import a Hub model (or an HF folder) into a native training checkpoint, verified",
        description="Map a transformers model back to a framework's native checkpoint (TorchTitan DCP, nanoGPT "
        "ckpt.pt, ...) with the adapter's inverse rules, write it streaming and atomically, and check that the "
        "native model computes the transformers model's logits (written as import.json).",
    )
    p.add_argument("--adapter", required=True, help="target framework (`hubconv adapters` lists them)")
    p.add_argument("--model", required=True, help="an HF model folder, or a Hub repo id REPO_ID[@REVISION]")
    p.add_argument("--output", required=True, help="output folder (created atomically)")
    p.add_argument("--model-args", help="native options as a JSON/YAML/TOML file (see docs/import.md)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (formats with rank files)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (formats with rank files)")
    p.add_argument("--dtype", default="auto", help="auto (keep the HF dtype), bfloat16, float16, float32")
    p.add_argument("--endpoint", help="Hub URL (default: $HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--positions", type=int, default=96, help="positions compared by the parity check (>= 64)")
    p.add_argument("--no-verify", action="store_true", help="skip the logits parity check")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print import.json to stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_from_args)
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from hubconv.importer import import_model

    result = import_model(
        args.adapter,
        args.model,
        args.output,
        model_args=args.model_args,
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        endpoint=args.endpoint,
        overwrite=args.overwrite,
        verify_parity=not args.no_verify,
        positions=args.positions,
        progress=not (args.quiet or args.json),
    )
    if args.json:
        json.dump(result.to_json(), sys.stdout, indent=2, default=str)
        print()
        return 0
    src = result.source["model"] + (f"@{result.source['revision']}" if result.source.get("revision") else "")
    commit = f" (commit {result.source['commit'][:12]})" if result.source.get("commit") else ""
    print(f"imported {src}{commit} into {result.adapter}: {result.output}")
    for name, size in result.files.items():
        print(f"  {name}  {size:,} bytes")
    for name, why in result.lossy.items():
        print(f"inexact: {name}: {why}")
    for name, why in result.dropped.items():
        print(f"dropped: {name}: {why}")
    par = result.parity
    if par is None:
        print("parity: skipped (--no-verify)")
    elif par["status"] == "skipped":
        print(f"parity: skipped ({par['reason']})")
    else:
        print(
            f"parity: {par['status']} on {par['positions']} positions (up to position {par['max_position']}): "
            f"max |diff| {par['max_abs_diff']:.3g} (limit {par['threshold']}), argmax identical: "
            f"{par['argmax_identical']}"
        )
    return 0
