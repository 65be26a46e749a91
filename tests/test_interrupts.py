"""Interrupted runs (issue 9): SIGTERM cleans up like SIGINT (exit 143 / 130), a SIGKILLed run's staging folder is
removed by the next run (only when its owner is dead), and the transformers target-check child dies with its parent
without writing anything. Real `hubconv convert` processes; `--no-cache` makes the target check a child process that
imports torch and transformers for a few seconds, the window in which the signals arrive."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubconv.atomic import remove_stale_staging, stale_staging
from tests.helpers import EXAMPLE_SOURCE

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="uses /proc and PR_SET_PDEATHSIG")


def _children(pid: int) -> list[int]:
    """Live (non-zombie) processes whose parent is `pid` and that run the target check."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z" and b"hubconv.hf_target" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def _staging(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if ".hubconv-" in n)


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hubconv", "convert", *EXAMPLE_SOURCE, "--output", str(out), "--quiet", "--no-cache"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _start_and_wait_for_child(out: Path) -> tuple[subprocess.Popen, int]:
    """A convert run, caught while its staging folder exists and its target-check child is running."""
    proc = _start(out)
    ok = _wait(lambda: (bool(_staging(out.parent)) and bool(_children(proc.pid))) or proc.poll() is not None)
    assert ok and proc.poll() is None, proc.communicate()
    (child,) = _children(proc.pid)
    return proc, child


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_signal_cleans_up(tmp_path, sig, code, word) -> None:
    out = tmp_path / "out"
    proc, child = _start_and_wait_for_child(out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert err.strip() == f"hubconv: {word}" and "Traceback" not in err
    assert not out.exists() and _staging(tmp_path) == []
    assert _wait(lambda: not _alive(child), 10), "the target-check child outlived the run"


def test_sigkill_leaves_a_stale_folder_that_the_next_run_removes(tmp_path) -> None:
    out = tmp_path / "out"
    proc, child = _start_and_wait_for_child(out)
    (stale,) = _staging(tmp_path)
    assert stale == f".out.hubconv-tmp-{proc.pid}"
    proc.kill()
    proc.communicate(timeout=60)
    # the child dies with its parent (PR_SET_PDEATHSIG) and never writes into the orphaned staging folder
    assert _wait(lambda: not _alive(child), 1.0), "the target-check child outlived its killed parent"
    time.sleep(0.5)
    written = sorted(os.listdir(tmp_path / stale))
    assert "config.json" not in written and "generation_config.json" not in written, written
    # a live process's folder (this test's own pid) is not touched; a dead one's is
    live = tmp_path / f".out.hubconv-tmp-{os.getpid()}"
    live.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "hubconv", "convert", *EXAMPLE_SOURCE, "--output", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert _staging(tmp_path) == [live.name]
    assert (out / "model.safetensors").is_file()


def test_stale_staging_only_matches_dead_owners_of_this_output(tmp_path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = {
        f".out.hubconv-tmp-{dead.pid}": True,  # dead convert
        f".out.hubconv-release-{dead.pid}": True,  # dead release
        f"..out.hubconv-release-{dead.pid}.hubconv-tmp-{dead.pid}": True,  # convert inside a dead release
        f".out.hubconv-tmp-{dead.pid}-old": True,  # a replaced output being removed
        f".out.hubconv-tmp-{os.getpid()}": False,  # alive
        f"..out.hubconv-release-{os.getpid()}.hubconv-tmp-{dead.pid}": False,  # one owner alive
        f".other.hubconv-tmp-{dead.pid}": False,  # another output's
        f".out.hubconv-tmp-{dead.pid}x": False,  # not a staging name
        "out": False,
    }
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".out.hubconv-tmp-{dead.pid + 1}").symlink_to(tmp_path / "out")  # never followed
    expected = sorted(str(tmp_path / n) for n, stale in names.items() if stale)
    assert stale_staging(str(tmp_path / "out")) == expected
    assert remove_stale_staging(str(tmp_path / "out")) == expected
    assert sorted(os.listdir(tmp_path)) == sorted(
        [n for n, stale in names.items() if not stale] + [f".out.hubconv-tmp-{dead.pid + 1}"]
    )


def test_target_check_child_exits_when_its_parent_dies(tmp_path) -> None:
    """A parent that starts the child and is killed at once: the child never gets to write anything."""
    script = (
        "import os, sys, time\n"
        "from hubconv.hf_target import TargetCheck\n"
        "c = TargetCheck('llama', {'hidden_size': 64, 'num_attention_heads': 4, 'num_hidden_layers': 1,"
        " 'intermediate_size': 128, 'vocab_size': 32, 'num_key_value_heads': 4}, {}, sys.argv[1], 'float32',"
        " use_cache=False)\n"
        "print(c._proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    assert _wait(lambda: not _alive(child), 1.0), "the child outlived its parent"
    time.sleep(0.5)
    assert os.listdir(tmp_path) == []
