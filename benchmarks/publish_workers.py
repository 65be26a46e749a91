"""Sharded publishing against one process: wall time, peak memory and bytes per step, on a loopback Hub.

    .venv/bin/python benchmarks/publish_workers.py [--size 1] [--workers 3] [--shard 200MB] [--workdir DIR]

Writes a TorchTitan DCP checkpoint of `--size` GB (benchmarks/parity.py's 1B-class width; bfloat16), warms the
page cache, then times, one process at a time (as on separate machines, without competing for this host's CPUs):

- `hubconv release --stream-upload` (one process: convert, upload, streamed verification, card, commit);
- each `hubconv publish worker --worker I/N` (its shards: convert, upload, manifest);
- `hubconv publish finalize` (manifests and Hub checks, streamed verification, card, commit).

On N machines the sharded release takes max(worker) + finalize; the table reports that next to the single
process, with each step's peak RSS and uploaded bytes. The Hub's LFS objects are dropped between the two
releases, so both upload everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from convert import folder_bytes, run, warm  # noqa: E402
from parity import MODEL_ARGS, SHAPE  # noqa: E402
from verify_large import _costs, _drop_uploads  # noqa: E402


def _row(wall: float, peak: int, tree: int, **extra: object) -> dict[str, object]:
    return {"wall_s": round(wall, 2), "peak_rss_MiB": round(peak / 2**20, 1), "tree_MiB": round(tree / 2**20), **extra}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0, help="checkpoint size in GB")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--shard", default="200MB", help="max shard size")
    ap.add_argument("--workdir", default="/tmp/hubconv-publish-workers")
    ap.add_argument("--hubconv", default=shutil.which("hubconv") or os.path.join(ROOT, ".venv", "bin", "hubconv"))
    ap.add_argument("--keep", action="store_true", help="keep checkpoint and outputs")
    a = ap.parse_args()
    from hubconv.devhub import DevHub

    os.makedirs(a.workdir, exist_ok=True)
    args_file = os.path.join(a.workdir, "model_args.json")
    with open(args_file, "w") as f:
        json.dump({"n_heads": SHAPE.n_heads, **MODEL_ARGS}, f)
    ckpt = os.path.join(a.workdir, "ckpt", "step-1")
    try:
        made = subprocess.run(
            [sys.executable, os.path.join(HERE, "verify_large.py"), "--make", ckpt, str(a.size)],
            check=True,
            capture_output=True,
        )
        warm(ckpt)
        source = ["--adapter", "torchtitan", "--checkpoint", ckpt, "--model-args", args_file]
        common = [*source, "--max-shard-size", a.shard, "--quiet"]
        results: dict[str, object] = {
            "checkpoint_bytes": folder_bytes(ckpt),
            "n_layers": int(made.stdout.split()[-1]),
            "workers": a.workers,
            "max_shard_size": a.shard,
        }
        hub_data = os.path.join(a.workdir, "hub")
        with DevHub(hub_data, orgs=("bench",)) as hub:
            os.environ.update({"HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1"})
            with open(os.path.join(a.workdir, "smoke.yml"), "w") as f:
                f.write("smoke:\n  prompts:\n    - prompt: The\n")  # one short prompt for every run
            common += ["--endpoint", hub.url, "--config", os.path.join(a.workdir, "smoke.yml")]
            out = os.path.join(a.workdir, "single")
            single = run(
                [a.hubconv, "release", *common, "--repo-id", "bench/single", "--stream-upload", "--output", out]
            )
            results["single_process"] = _row(*single, **_costs(out))
            _drop_uploads(hub_data)
            manifests = os.path.join(a.workdir, "manifests")
            sharded = [*common, "--repo-id", "bench/sharded", "--manifests", manifests]
            rows = []
            for i in range(1, a.workers + 1):
                step = run([a.hubconv, "publish", "worker", "--worker", f"{i}/{a.workers}", *sharded])
                with open(os.path.join(manifests, f"hubconv-shards-{i}-of-{a.workers}.json")) as f:
                    shards = json.load(f)["shards"]
                rows.append(_row(*step, shards=len(shards), uploaded_bytes=sum(s["size"] for s in shards)))
            results["worker"] = rows
            out = os.path.join(a.workdir, "final")
            final = run([a.hubconv, "publish", "finalize", *sharded, "--output", out])
            results["finalize"] = _row(*final, **_costs(out))
            slowest = max(float(r["wall_s"]) for r in rows)  # type: ignore[arg-type]
            results["sharded_critical_path_s"] = round(slowest + float(results["finalize"]["wall_s"]), 2)  # type: ignore[index]
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
