"""Peak memory and wall time of verified releases of models larger than comfortable: streamed verification.

    .venv/bin/python benchmarks/verify_large.py [--sizes 1,4] [--workdir /tmp/hubconv-verify-large]
                                                [--cgroup-limit 3GiB] [--no-cgroup] [--keep]

For each size (GB of bfloat16 weights; benchmarks/parity.py's 1B-class width — dim 2048, 32/8 heads, FFN 8192,
vocab 32768, Llama 3.1 RoPE scaling — and more layers for more GB; values like a freshly initialized model, so
logits are finite) it writes a TorchTitan DCP checkpoint, warms the page cache, then times, one process each:

- `hubconv release --dry-run` (convert, smoke test with parity and generation, card), and
- `hubconv release --stream-upload` to a loopback Hub (hubconv's devhub, run by this script; shards of 500 MB
  uploaded as they are written, never all on disk; the smoke test runs on the conversion plan's views).

Each run reports wall time, peak RSS of the hubconv process (VmHWM) and of its process tree (sampled), and the
time split read from the release's smoke.json: convert, load checks, parity (converted model and native
reference), generation, and the rest (start-up, card, and for --stream-upload the final commit: uploads overlap
the conversion). Finally, `release --stream-upload` of the largest size runs inside a cgroup v1 memory group
capped below the model's size (`memory.limit_in_bytes`; needs root) and must pass parity. Checkpoints, outputs
and the Hub's data are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from convert import folder_bytes, hwm, make_checkpoint, tree_rss, warm  # noqa: E402
from parity import MODEL_ARGS, SHAPE, init_like_training  # noqa: E402

CGROUP_ROOT = "/sys/fs/cgroup/memory"
TARGET_RSS = 1.5 * 2**30
TARGET_GROWTH = 0.10
TARGET_WALL_4GB = 55.0


def _size(text: str) -> int:
    from hubconv.io.writer import parse_size

    return parse_size(text, option="--cgroup-limit")


def _costs(out: str) -> dict[str, float]:
    with open(os.path.join(out, "smoke.json")) as f:
        smoke = json.load(f)
    costs = smoke.get("costs", {})
    parity = smoke.get("parity") or {}
    return {
        "status": smoke["status"],
        "mode": smoke["mode"],
        "parity_passed": parity.get("passed"),
        "parity_max_abs_diff": parity.get("max_abs_diff"),
        "convert_s": costs.get("convert_seconds"),
        "load_checks_s": costs.get("load_checks_seconds", costs.get("load_seconds")),
        "parity_converted_s": costs.get("parity_seconds"),
        "parity_reference_s": costs.get("parity_reference_seconds"),
        "generation_s": costs.get("generation_seconds"),
        "generation_tokens_per_s": costs.get("generation_tokens_per_second"),
        "smoke_s": costs.get("smoke_seconds"),
        "passes_over_weights": costs.get("passes"),
    }


def _release_cmd(hubconv: str, ckpt: str, args_file: str, out: str) -> list[str]:
    return [
        *(hubconv, "release", "--adapter", "torchtitan", "--checkpoint", ckpt, "--model-args", args_file),
        *("--output", out, "--overwrite", "--quiet", "--json", "--prompt", "The"),
    ]


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int, int, float, float]:
    """(wall s, peak RSS of the process (VmHWM), sampled peak RSS of its tree, CPU s of the tree, load average).

    As benchmarks/convert.py's `run`, plus the CPU time of the process and its children (wait4), so that runs on a
    shared machine can be compared: wall time there depends on the other load (reported as the 1-minute load
    average at the end)."""
    import threading

    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, **env})
    peak, peak_tree, done = 0, 0, threading.Event()

    def sample() -> None:
        nonlocal peak, peak_tree
        while not done.is_set():
            peak = max(peak, hwm(proc.pid))
            peak_tree = max(peak_tree, tree_rss(proc.pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read().decode() if proc.stderr else ""  # drained while running (progress lines)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {stderr[-3000:]}")
    return wall, peak, peak_tree, usage.ru_utime + usage.ru_stime, os.getloadavg()[0]


def _measure(cmd: list[str], out: str, env: dict[str, str]) -> dict[str, object]:
    wall, peak, tree, cpu, load = run(cmd, env)
    row: dict[str, object] = {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "load_average_1min": round(load, 1),
        "peak_rss_MiB": round(peak / 2**20, 1),
        "peak_rss_tree_MiB": round(tree / 2**20, 1),
        **_costs(out),
    }
    accounted = sum(float(row[k] or 0) for k in ("convert_s", "smoke_s"))  # type: ignore[arg-type]
    row["other_s"] = round(wall - accounted, 2)  # start-up, card, commit (uploads overlap the conversion)
    return row


def _cgroup_run(cmd: list[str], limit: int, env: dict[str, str], out: str) -> dict[str, object]:
    """`cmd` inside a fresh cgroup v1 memory group capped at `limit` bytes."""
    group = os.path.join(CGROUP_ROOT, f"hubconv-verify-large-{os.getpid()}")
    os.makedirs(group)
    try:
        with open(os.path.join(group, "memory.limit_in_bytes"), "w") as f:
            f.write(str(limit))
        start = time.perf_counter()
        wrapped = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
        proc = subprocess.run(wrapped, env={**os.environ, **env}, capture_output=True, text=True)
        wall = time.perf_counter() - start

        def read(name: str) -> int:
            with open(os.path.join(group, name)) as f:
                return int(f.read())

        row: dict[str, object] = {
            "limit_GiB": round(limit / 2**30, 2),
            "returncode": proc.returncode,
            "wall_s": round(wall, 2),
            "cgroup_max_usage_MiB": round(read("memory.max_usage_in_bytes") / 2**20, 1),
            "cgroup_failcnt": read("memory.failcnt"),
        }
        if proc.returncode != 0:
            row["stderr_tail"] = proc.stderr[-2000:]
        elif os.path.exists(os.path.join(out, "smoke.json")):
            row.update(_costs(out))
        return row
    finally:
        for _ in range(50):  # the group can be removed once its last process is gone
            try:
                os.rmdir(group)
                break
            except OSError:
                time.sleep(0.1)


def _drop_uploads(hub_data: str) -> None:
    """Delete the Hub's uploaded LFS objects (disk is limited; the next run uploads everything again)."""
    lfs = os.path.join(hub_data, "objects", "lfs")
    shutil.rmtree(lfs, ignore_errors=True)
    os.makedirs(lfs, exist_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,4", help="comma-separated checkpoint sizes in GB")
    ap.add_argument("--workdir", default="/tmp/hubconv-verify-large")
    ap.add_argument("--hubconv", default=shutil.which("hubconv") or os.path.join(ROOT, ".venv", "bin", "hubconv"))
    ap.add_argument("--cgroup-limit", default="3GiB", help="memory cap of the cgroup run (default 3GiB)")
    ap.add_argument("--no-cgroup", action="store_true", help="skip the memory-capped run")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    ap.add_argument("--make", nargs=2, metavar=("PATH", "GB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make:  # child mode: build one checkpoint, so the parent's memory stays small
        print(make_checkpoint(a.make[0], float(a.make[1]), SHAPE, init_like_training))
        return 0
    from hubconv.devhub import DevHub

    os.makedirs(a.workdir, exist_ok=True)
    args_file = os.path.join(a.workdir, "model_args.json")
    with open(args_file, "w") as f:
        json.dump({"n_heads": SHAPE.n_heads, **MODEL_ARGS}, f)
    results: dict[str, object] = {"shape": SHAPE.__dict__}
    sizes = [float(s) for s in a.sizes.split(",")]
    hub_data = os.path.join(a.workdir, "hub")
    try:
        with DevHub(hub_data, orgs=("bench",)) as hub:
            hub_env = {"HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1"}
            for size in sizes:
                ckpt = os.path.join(a.workdir, f"ckpt-{size:g}GB", "step-1")
                made = subprocess.run(
                    [sys.executable, __file__, "--make", ckpt, str(size)], check=True, capture_output=True
                )
                n_layers = int(made.stdout.split()[-1])
                warm(ckpt)
                out = os.path.join(a.workdir, "release")
                base = _release_cmd(a.hubconv, ckpt, args_file, out)
                dry = _measure([*base, "--dry-run"], out, {})
                shutil.rmtree(out, ignore_errors=True)
                repo = f"bench/model-{size:g}gb"
                stream_args = ["--stream-upload", "--max-shard-size", "500MB", "--repo-id", repo]
                stream = _measure([*base, *stream_args, "--endpoint", hub.url], out, hub_env)
                shutil.rmtree(out, ignore_errors=True)
                _drop_uploads(hub_data)
                results[f"{size:g}GB"] = row = {
                    "n_layers": n_layers,
                    "checkpoint_bytes": folder_bytes(ckpt),
                    "dry_run": dry,
                    "stream_upload": stream,
                }
                print(f"{size:g} GB ({n_layers} layers): {json.dumps(row)}", flush=True)
                if size == max(sizes) and not a.no_cgroup:
                    limit = _size(a.cgroup_limit)
                    capped = _cgroup_run(
                        [*base, *stream_args, "--repo-id", f"{repo}-capped", "--endpoint", hub.url],
                        limit,
                        hub_env,
                        out,
                    )
                    row["cgroup_stream_upload"] = capped
                    print(f"{size:g} GB in a {a.cgroup_limit} cgroup: {json.dumps(capped)}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
                    _drop_uploads(hub_data)
                if not a.keep:
                    shutil.rmtree(os.path.dirname(ckpt), ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    results["targets"] = _targets(results, sizes)
    json.dump(results, sys.stdout, indent=2)
    print()
    return 0


def _targets(results: dict[str, object], sizes: list[float]) -> dict[str, object]:
    """The issue's targets against the measured rows."""
    rows = {s: results[f"{s:g}GB"] for s in sizes}
    verdict: dict[str, object] = {}
    for mode in ("dry_run", "stream_upload"):
        peaks = {s: r[mode]["peak_rss_MiB"] for s, r in rows.items()}  # type: ignore[index]
        verdict[f"{mode}_peak_rss_within_1.5GiB"] = all(p * 2**20 <= TARGET_RSS for p in peaks.values())
        if len(sizes) >= 2:
            growth = peaks[sizes[-1]] / peaks[sizes[0]] - 1
            verdict[f"{mode}_rss_growth"] = round(growth, 3)
            verdict[f"{mode}_rss_flat_within_10pct"] = growth <= TARGET_GROWTH
        largest = rows[sizes[-1]][mode]  # type: ignore[index]
        verdict[f"{mode}_wall_largest_s"] = largest["wall_s"]
        verdict[f"{mode}_every_check_passed"] = all(r[mode]["status"] == "pass" for r in rows.values())  # type: ignore[index]
    capped = rows[sizes[-1]].get("cgroup_stream_upload")  # type: ignore[union-attr]
    if capped:
        verdict["cgroup_run_completed_with_parity"] = capped["returncode"] == 0 and capped.get("parity_passed") is True
    return verdict


if __name__ == "__main__":
    sys.exit(main())
