"""Benchmark `hubconv import` of a large Llama (HF safetensors) against `cp -r` of the same folder.

    .venv/bin/python benchmarks/import_large.py [--size 4] [--repeats 3] [--workdir /tmp/hubconv-import]

Builds benchmarks/convert.py's bf16 TorchTitan Llama checkpoint of `--size` GB (width 2048, GQA 16/4 heads,
vocab 32000; random bit patterns), converts it once to HF safetensors with `hubconv convert`, warms the page
cache, then alternates `cp -r HF DST`, `hubconv import --adapter torchtitan` (DCP) and `hubconv import --adapter
megatron --tp 2` (two rank files) — each preceded by `sync`, outputs deleted between runs, `--no-verify` (the
parity check loads the transformers model: a memory cost of the check, not of the import) — and prints median
wall times (start-up included), the median per-pair ratio to `cp`, and peak RSS (the process's VmHWM and its
process tree, sampled every 5 ms). The work folder is deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert import N_HEADS, ROOT, folder_bytes, run, warm

GIB = 1 << 30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=4.0, help="checkpoint size in GB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/hubconv-import")
    ap.add_argument("--hubconv", default=shutil.which("hubconv") or os.path.join(ROOT, ".venv", "bin", "hubconv"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    try:
        return bench(a)
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)


def bench(a: argparse.Namespace) -> int:
    ckpt = os.path.join(a.workdir, "dcp", "step-1")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "convert.py"), "--make", ckpt, str(a.size)],
        check=True,
        capture_output=True,
    )
    args_file = os.path.join(a.workdir, "model_args.json")
    json.dump({"n_heads": N_HEADS, "rope_theta": 500000, "rope_scaling_args": None}, open(args_file, "w"))
    hf = os.path.join(a.workdir, "hf")
    subprocess.run(
        [a.hubconv, "convert", "--adapter", "torchtitan", "--checkpoint", ckpt, "--model-args", args_file,
         "--output", hf, "--quiet", "--overwrite"],
        check=True,
    )  # fmt: skip
    shutil.rmtree(os.path.dirname(ckpt))  # only the HF folder is needed from here on
    dst = os.path.join(a.workdir, "out")
    commands = {
        "torchtitan-dcp": [a.hubconv, "import", "--adapter", "torchtitan", "--model", hf, "--output", dst],
        "megatron-tp2": [a.hubconv, "import", "--adapter", "megatron", "--tp", "2", "--model", hf, "--output", dst],
    }
    for cmd in commands.values():
        cmd += ["--no-verify", "--quiet", "--overwrite"]
    warm(hf)
    for cmd in commands.values():  # warm-up: interpreter and libraries in the page cache
        run(cmd)
        shutil.rmtree(dst)
    times: dict[str, list[float]] = {"cp": [], **{k: [] for k in commands}}
    peaks: dict[str, list[int]] = {k: [] for k in commands}
    trees: dict[str, list[int]] = {k: [] for k in commands}
    out_bytes: dict[str, int] = {}
    for _ in range(a.repeats):
        times["cp"].append(run(["cp", "-r", hf, dst])[0])
        shutil.rmtree(dst)
        for name, cmd in commands.items():
            t, peak, tree = run(cmd)
            times[name].append(t)
            peaks[name].append(peak)
            trees[name].append(tree)
            out_bytes[name] = folder_bytes(dst)
            shutil.rmtree(dst)
    result: dict[str, object] = {
        "hf_bytes": folder_bytes(hf),
        "cp_seconds_median": round(statistics.median(times["cp"]), 2),
        "repeats": a.repeats,
    }
    for name in commands:
        ratios = [t / c for t, c in zip(times[name], times["cp"], strict=True)]
        result[name] = {
            "seconds_median": round(statistics.median(times[name]), 2),
            "ratio_to_cp_median": round(statistics.median(ratios), 2),
            "peak_rss_mib": round(max(peaks[name]) / (1 << 20)),
            "peak_tree_rss_mib": round(max(trees[name]) / (1 << 20)),
            "output_bytes": out_bytes[name],
            "under_1_gib": max(peaks[name]) <= GIB and max(trees[name]) <= GIB,
        }
    print(json.dumps(result, indent=2))
    return 0 if all(result[n]["under_1_gib"] for n in commands) else 1  # type: ignore[index]


if __name__ == "__main__":
    raise SystemExit(main())
