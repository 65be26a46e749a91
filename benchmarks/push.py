"""Benchmark streaming upload (`release --stream-upload`) against convert-then-push, on the loopback Hub.

    .venv/bin/python benchmarks/push.py [--gigabytes 2] [--shard-size 500MB] [--repeats 2]

Builds a bf16 TorchTitan checkpoint of about `--gigabytes` GB (see benchmarks/convert.py), starts
`hubconv devhub` in its own process, and times, per repeat, into fresh repos:
  1. `hubconv convert` alone (to local disk),
  2. `hubconv push` of that folder alone (upload + commit),
  3. `hubconv release --stream-upload` (convert while uploading each finished shard, then commit).
It prints the ratio 3 / (1 + 2) (overlap makes it < 1) and the peak disk used by the streaming run,
both as reported by hubconv and as sampled from the file system every 20 ms, against two shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from convert import N_HEADS, folder_bytes, warm  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict[str, str], watch: str | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak bytes of files under `watch` sampled every 20 ms, stdout)."""
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, folder_bytes(watch))
            except OSError:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True) if watch else None
    if sampler:
        sampler.start()
    start = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    done.set()
    if sampler:
        sampler.join()
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    return wall, peak, r.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gigabytes", type=float, default=2.0)
    ap.add_argument("--shard-size", default="500MB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=os.path.join(HERE, ".work"))
    a = ap.parse_args()
    hubconv = os.path.join(os.path.dirname(sys.executable), "hubconv")
    os.makedirs(a.workdir, exist_ok=True)
    ckpt = os.path.join(a.workdir, f"ckpt-{a.gigabytes:g}GB", "step-1")
    subprocess.run(
        [sys.executable, os.path.join(HERE, "convert.py"), "--make", ckpt, str(a.gigabytes)],
        check=True,
        capture_output=True,
    )
    args_file = os.path.join(a.workdir, "model_args.json")
    json.dump({"n_heads": N_HEADS, "rope_theta": 500000, "rope_scaling_args": None}, open(args_file, "w"))
    warm(ckpt)

    data = os.path.join(a.workdir, "hub-data")
    shutil.rmtree(data, ignore_errors=True)
    port, token = free_port(), "hubconv-bench-token"
    server = subprocess.Popen(
        [hubconv, "devhub", "--port", str(port), "--data", data, "--token", token, "--org", "bench"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {**os.environ, "HF_TOKEN": token, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_DISABLE_XET": "1"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        out_dir = os.path.join(a.workdir, "push", "out")  # its folder holds only outputs and staging folders
        os.makedirs(os.path.dirname(out_dir), exist_ok=True)
        common = [
            "--adapter",
            "torchtitan",
            "--checkpoint",
            ckpt,
            "--model-args",
            args_file,
            "--max-shard-size",
            a.shard_size,
        ]
        rows = []
        for i in range(a.repeats):
            shutil.rmtree(out_dir, ignore_errors=True)
            t_convert, _, _ = timed([hubconv, "convert", *common, "--output", out_dir, "--quiet"], env)
            shard_sizes = [
                os.path.getsize(os.path.join(out_dir, n)) for n in os.listdir(out_dir) if n.endswith(".safetensors")
            ]
            t_push, _, _ = timed([hubconv, "push", out_dir, "--repo-id", f"bench/seq-{i}"], env)
            shutil.rmtree(out_dir)
            t_stream, peak_sampled, stdout = timed(
                [
                    hubconv,
                    "release",
                    *common,
                    "--output",
                    out_dir,
                    "--stream-upload",
                    "--no-parity",
                    "--repo-id",
                    f"bench/stream-{i}",
                    "--quiet",
                    "--json",
                    "--overwrite",
                ],
                env,
                watch=os.path.dirname(out_dir),
            )
            result = json.loads(stdout[stdout.index("{") :])
            rows.append(
                {
                    "convert_s": round(t_convert, 2),
                    "push_s": round(t_push, 2),
                    "stream_s": round(t_stream, 2),
                    "ratio": round(t_stream / (t_convert + t_push), 3),
                    "peak_disk_reported_bytes": result["stream"]["peak_shard_bytes_on_disk"],
                    "peak_disk_sampled_bytes": peak_sampled,
                    "two_largest_shards_bytes": sum(sorted(shard_sizes)[-2:]),
                    "shards": len(shard_sizes),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
        print(
            json.dumps(
                {
                    "model_bytes": folder_bytes(ckpt),
                    "median_ratio": statistics.median(r["ratio"] for r in rows),
                    "max_peak_disk_sampled_bytes": max(r["peak_disk_sampled_bytes"] for r in rows),
                    "two_largest_shards_bytes": rows[0]["two_largest_shards_bytes"],
                },
                indent=2,
            )
        )
    finally:
        server.terminate()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
