"""Benchmark `hubconv convert` against `cp -r` of the same TorchTitan DCP checkpoint.

    .venv/bin/python benchmarks/convert.py [--sizes 1,4] [--repeats 5] [--workdir benchmarks/.work]

For each size (GB of bfloat16 weights; same width, more layers) it writes a TorchTitan-layout DCP
checkpoint once, warms the page cache, then alternates `cp -r CKPT DST` and
`hubconv convert --checkpoint CKPT --output DST` (each preceded by `sync`, outputs deleted between
runs) and prints, per size: median wall times (process start to exit, start-up included), the
median of the per-pair ratios hubconv/cp, and peak RSS — of the hubconv process itself (VmHWM)
and of its whole process tree (sampled every 5 ms). Each pair also times `hubconv convert
--no-cache`, where a child process imports transformers to check the target architecture (the
default run finds that answer in the cache filled by the warm-up run, as repeated releases of one
architecture do).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, N_HEADS, N_KV_HEADS, VOCAB, MULTIPLE_OF = 2048, 16, 4, 32000, 256


@dataclass(frozen=True)
class Shape:
    """Width of a TorchTitan Llama 3 checkpoint; the depth follows from its size in GB."""

    dim: int = DIM
    n_heads: int = N_HEADS
    n_kv_heads: int = N_KV_HEADS
    vocab: int = VOCAB
    ffn: int = 0  # 0: TorchTitan's default hidden size for `dim`


# Fills one tensor: (name, shape, generator) -> bfloat16 tensor.
Init = Callable[[str, tuple[int, ...], "torch.Generator"], "torch.Tensor"]


def ffn_dim(shape: Shape = Shape()) -> int:
    if shape.ffn:
        return shape.ffn
    hidden = int(2 * 4 * shape.dim / 3)
    return MULTIPLE_OF * ((hidden + MULTIPLE_OF - 1) // MULTIPLE_OF)


def layer_bytes(shape: Shape = Shape()) -> int:
    hd = shape.dim // shape.n_heads
    attn = 2 * shape.dim * shape.dim + 2 * shape.n_kv_heads * hd * shape.dim
    return 2 * (attn + 3 * ffn_dim(shape) * shape.dim + 2 * shape.dim)


def random_bits(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random bit patterns: for timing, content does not matter, only bytes."""
    import torch

    return torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=g).view(torch.bfloat16)


def make_checkpoint(path: str, gigabytes: float, shape: Shape = Shape(), init: Init = random_bits) -> int:
    """Write a bf16 TorchTitan Llama DCP of about `gigabytes` GB; returns the layer count."""
    import torch
    import torch.distributed.checkpoint as dcp

    dim, vocab = shape.dim, shape.vocab
    fixed = 2 * 2 * vocab * dim + 2 * dim
    n_layers = max(1, round((gigabytes * 1e9 - fixed) / layer_bytes(shape)))
    meta = os.path.join(path, "layers.json")
    stamp = {"n_layers": n_layers, "shape": asdict(shape), "init": init.__name__}
    if os.path.exists(meta) and json.load(open(meta)) == stamp:
        return n_layers
    shutil.rmtree(path, ignore_errors=True)
    g = torch.Generator().manual_seed(0)
    ffn, kv = ffn_dim(shape), shape.n_kv_heads * (dim // shape.n_heads)
    shapes = {"tok_embeddings.weight": (vocab, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes |= {
            p + "attention.wq.weight": (dim, dim),
            p + "attention.wk.weight": (kv, dim),
            p + "attention.wv.weight": (kv, dim),
            p + "attention.wo.weight": (dim, dim),
            p + "feed_forward.w1.weight": (ffn, dim),
            p + "feed_forward.w2.weight": (dim, ffn),
            p + "feed_forward.w3.weight": (ffn, dim),
            p + "attention_norm.weight": (dim,),
            p + "ffn_norm.weight": (dim,),
        }
    shapes |= {"norm.weight": (dim,), "output.weight": (vocab, dim)}
    sd = {name: init(name, s, g) for name, s in shapes.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(sd, checkpoint_id=path)
    json.dump(stamp, open(meta, "w"))
    return n_layers


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def warm(path: str) -> None:
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def tree_rss(pid: int) -> int:
    """Sum of RSS (bytes) of `pid` and its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += rss.get(p, 0)
        stack += children.get(p, [])
    return total


def hwm(pid: int) -> int:
    """Peak RSS (VmHWM, bytes) of `pid` since its exec; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str]) -> tuple[float, int, int]:
    """(wall seconds, peak RSS of the process (VmHWM), sampled peak RSS of its process tree).

    ru_maxrss from wait4 is not used: after fork it can report the parent's RSS."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, peak_tree, done = 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, peak_tree
        while not done.is_set():
            peak = max(peak, hwm(proc.pid))  # VmHWM is monotonic: the last read before exit is the peak
            peak_tree = max(peak_tree, tree_rss(proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # Wait for the exit without reaping, so the sampler's last reads still find the process.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    status = proc.wait()
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, peak, peak_tree


def bench_file_checkpoint(
    script: str,
    adapter_args: list[str],
    sizes: list[float],
    repeats: int,
    workdir: str,
    hubconv: str,
    name: str = "ckpt.pt",
) -> dict[str, object]:
    """Time `hubconv convert` of one-file checkpoints (`script --make PATH GB` builds each in a child process, so
    this process stays small) against `cp` of the same file, alternating, page cache warm; peak RSS of hubconv and
    of its process tree. Prints a line per size and the RSS growth from the smallest to the largest. `name` is the
    checkpoint's name in `workdir` (a file, or a folder that `cp -r` copies)."""
    results: dict[str, object] = {}
    try:
        for size in sizes:
            shutil.rmtree(workdir, ignore_errors=True)
            ckpt = os.path.join(workdir, name)
            made = subprocess.run([sys.executable, script, "--make", ckpt, str(size)], check=True, capture_output=True)
            n_layers = int(made.stdout.split()[-1])
            dst = os.path.join(workdir, "hf")
            warm(workdir)
            cmd = [hubconv, "convert", *adapter_args, "--checkpoint", ckpt, "--output", dst, "--quiet", "--overwrite"]
            run(cmd)  # warm-up: libraries in the page cache, target architecture cached
            shutil.rmtree(dst)
            cp_t, hub_t, rss, tree = [], [], [], []
            for _ in range(repeats):
                cp_t.append(run(["cp", "-r", ckpt, dst + ".copy"])[0])
                subprocess.run(["rm", "-rf", dst + ".copy"], check=True)
                t, r, tr = run(cmd)
                hub_t.append(t)
                rss.append(r)
                tree.append(tr)
                out_bytes = folder_bytes(dst)
                shutil.rmtree(dst)
            ratios = [h / c for h, c in zip(hub_t, cp_t, strict=True)]
            results[f"{size:g}GB"] = r_ = {
                "n_layers": n_layers,
                "checkpoint_bytes": folder_bytes(ckpt) if os.path.isdir(ckpt) else os.path.getsize(ckpt),
                "output_bytes": out_bytes,
                "cp_median_s": round(statistics.median(cp_t), 3),
                "hubconv_median_s": round(statistics.median(hub_t), 3),
                "ratio_median_of_pairs": round(statistics.median(ratios), 3),
                "peak_rss_hubconv_MiB": round(max(rss) / 2**20, 1),
                "peak_rss_tree_MiB": round(max(tree) / 2**20, 1),
                "cp_s": [round(x, 3) for x in cp_t],
                "hubconv_s": [round(x, 3) for x in hub_t],
            }
            print(
                f"{size:g} GB ({n_layers} layers): cp {r_['cp_median_s']} s, hubconv {r_['hubconv_median_s']} s "
                f"(ratio {r_['ratio_median_of_pairs']}, median of pairs); peak RSS {r_['peak_rss_hubconv_MiB']} MiB "
                f"(process tree {r_['peak_rss_tree_MiB']} MiB)",
                flush=True,
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report_growth(results)
    return results


def file_checkpoint_main(
    doc: str | None,
    script: str,
    make: Callable[[str, float], int],
    adapter_args: list[str],
    workdir: str,
    name: str = "ckpt.pt",
    sizes: str = "0.5,2",
) -> int:
    """The command line of a one-file-checkpoint benchmark: `--sizes`, `--repeats`, `--workdir`, `--hubconv`, and
    the hidden child mode `--make PATH GB` that builds one checkpoint with `make` (returns its layer count)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default=sizes, help="comma-separated checkpoint sizes in GB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=workdir)
    ap.add_argument("--hubconv", default=shutil.which("hubconv") or os.path.join(ROOT, ".venv", "bin", "hubconv"))
    ap.add_argument("--make", nargs=2, metavar=("PATH", "GB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # child mode: build one checkpoint, so the parent's memory stays small
        print(make(a.make[0], float(a.make[1])))
        return 0
    sizes = [float(s) for s in a.sizes.split(",")]
    results = bench_file_checkpoint(script, adapter_args, sizes, a.repeats, a.workdir, a.hubconv, name)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


def report_growth(results: dict[str, object]) -> None:
    """Add and print the peak-RSS growth from the smallest to the largest size (flat memory means ~0)."""
    sizes = [k for k in results if k.endswith("GB")]
    if len(sizes) >= 2:
        small, big = results[sizes[0]], results[sizes[-1]]
        growth = big["peak_rss_hubconv_MiB"] / small["peak_rss_hubconv_MiB"] - 1  # type: ignore[index]
        results["rss_growth_largest_vs_smallest"] = round(growth, 3)
        print(f"peak RSS growth {sizes[0]} -> {sizes[-1]}: {growth:+.1%}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="comma-separated checkpoint sizes in GB")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=os.path.join(ROOT, "benchmarks", ".work"))
    ap.add_argument("--hubconv", default=shutil.which("hubconv") or os.path.join(ROOT, ".venv", "bin", "hubconv"))
    ap.add_argument("--make", nargs=2, metavar=("PATH", "GB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # child mode: build one checkpoint, so the parent's memory stays small
        print(make_checkpoint(a.make[0], float(a.make[1])))
        return 0
    os.makedirs(a.workdir, exist_ok=True)
    args_file = os.path.join(a.workdir, "model_args.json")
    json.dump({"n_heads": N_HEADS, "rope_theta": 500000, "rope_scaling_args": None}, open(args_file, "w"))
    results = {}
    for size in [float(s) for s in a.sizes.split(",")]:
        ckpt = os.path.join(a.workdir, f"ckpt-{size:g}GB", "step-1")
        made = subprocess.run([sys.executable, __file__, "--make", ckpt, str(size)], check=True, capture_output=True)
        n_layers = int(made.stdout.split()[-1])
        dst = os.path.join(a.workdir, "out")
        warm(ckpt)
        hub_cmd = [
            a.hubconv,
            "convert",
            "--adapter",
            "torchtitan",
            "--checkpoint",
            ckpt,
            "--output",
            dst,
            "--model-args",
            args_file,
            "--quiet",
            "--overwrite",
        ]
        run(hub_cmd)  # warm-up: interpreter and libraries in the page cache, target architecture cached
        shutil.rmtree(dst)
        cp_t, hub_t, cold_t, rss, tree, cold_tree = [], [], [], [], [], []
        for _ in range(a.repeats):
            cp_t.append(run(["cp", "-r", ckpt, dst])[0])
            shutil.rmtree(dst)
            t, r, tr = run(hub_cmd)
            hub_t.append(t)
            rss.append(r)
            tree.append(tr)
            out_bytes = folder_bytes(dst)
            shutil.rmtree(dst)
            t, r, tr = run([*hub_cmd, "--no-cache"])  # cold: transformers imported in a child process
            cold_t.append(t)
            rss.append(r)
            cold_tree.append(tr)
            shutil.rmtree(dst)
        ratios = [h / c for h, c in zip(hub_t, cp_t, strict=True)]
        cold_ratios = [h / c for h, c in zip(cold_t, cp_t, strict=True)]
        results[f"{size:g}GB"] = r_ = {
            "n_layers": n_layers,
            "checkpoint_bytes": folder_bytes(ckpt),
            "output_bytes": out_bytes,
            "cp_median_s": round(statistics.median(cp_t), 3),
            "hubconv_median_s": round(statistics.median(hub_t), 3),
            "ratio_median_of_pairs": round(statistics.median(ratios), 3),
            "ratio_of_medians": round(statistics.median(hub_t) / statistics.median(cp_t), 3),
            "no_cache_median_s": round(statistics.median(cold_t), 3),
            "no_cache_ratio_median_of_pairs": round(statistics.median(cold_ratios), 3),
            "peak_rss_hubconv_MiB": round(max(rss) / 2**20, 1),
            "peak_rss_tree_MiB": round(max(tree) / 2**20, 1),
            "peak_rss_tree_no_cache_MiB": round(max(cold_tree) / 2**20, 1),
            "cp_s": [round(x, 3) for x in cp_t],
            "hubconv_s": [round(x, 3) for x in hub_t],
            "no_cache_s": [round(x, 3) for x in cold_t],
        }
        print(
            f"{size:g} GB ({n_layers} layers): cp {r_['cp_median_s']} s, hubconv {r_['hubconv_median_s']} s "
            f"(ratio {r_['ratio_median_of_pairs']}, median of pairs), with --no-cache {r_['no_cache_median_s']} s "
            f"(ratio {r_['no_cache_ratio_median_of_pairs']}); peak RSS {r_['peak_rss_hubconv_MiB']} MiB "
            f"(process tree {r_['peak_rss_tree_MiB']} MiB, {r_['peak_rss_tree_no_cache_MiB']} MiB with the "
            "transformers child)",
            flush=True,
        )
    report_growth(results)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
