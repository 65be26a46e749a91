"""`hubconv smoke`: loading, generation, special tokens and parity checks, and their failure modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubconv.config import Prompt
from hubconv.convert import convert
from hubconv.errors import HubconvError
from hubconv.smoke import run_smoke, write_report
from tests.test_torchtitan import _swap_qk, make, tiny, user_args


@pytest.fixture
def converted(tmp_path):
    a = tiny(n_layers=3)
    ckpt, sd = make(tmp_path, a)
    out = str(tmp_path / "hf")
    convert("torchtitan", ckpt, out, model_args={**user_args(a), "eos_token_id": 7}, progress=False)
    return a, ckpt, sd, out


def statuses(report) -> dict[str, str]:
    return {c.name.split(" ")[0]: c.status for c in report.checks}


def test_smoke_passes_and_writes_evidence(converted) -> None:
    _, ckpt, _, out = converted
    report = run_smoke(out, native=("torchtitan", ckpt), max_new_tokens=8)
    assert report.status == "pass", report.checks
    assert report.parity is not None and report.parity.passed and report.parity.positions == 96
    assert report.parity.max_abs_diff < 1e-4 and report.parity.top1_agreement == 1.0
    assert report.dtype == "float32" and report.loading_info["missing_keys"] == []
    assert report.generations[0].new_tokens == 8
    write_report(out, report)
    data = json.load(open(os.path.join(out, "smoke.json")))
    assert data["status"] == "pass" and data["parity"]["kl_divergence"] < 1e-6
    assert "| parity | ✅ |" in open(os.path.join(out, "smoke.md")).read()


def test_wrong_permute_is_caught_by_parity_but_not_by_a_short_greedy_check(converted) -> None:
    a, ckpt, sd, out = converted
    _swap_qk(out, sd, a, "k-with-n_heads")
    report = run_smoke(out, native=("torchtitan", ckpt), max_new_tokens=5)
    s = statuses(report)
    assert s["generate"] == "pass"  # 5 greedy tokens look fine...
    assert s["parity"] == "fail" and report.status == "fail"  # ...the logits do not
    assert report.parity.first_divergent_position > 0  # position 0 has no rotation: the bug hides there


def test_nan_weights_fail_generation(converted) -> None:
    _, ckpt, _, out = converted
    path = os.path.join(out, "model.safetensors")
    w = load_file(path)
    w["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(w, path, metadata={"format": "pt"})
    report = run_smoke(out, native=("torchtitan", ckpt), max_new_tokens=4)
    assert statuses(report)["generate"] == "fail" and report.status == "fail"
    assert report.generations[0].output.startswith("[non-finite logits]")


def test_eos_mismatch_fails(converted) -> None:
    _, _, _, out = converted
    path = os.path.join(out, "generation_config.json")
    gen = json.load(open(path))
    gen["eos_token_id"] = 8
    json.dump(gen, open(path, "w"))
    report = run_smoke(out, parity=False, max_new_tokens=2)
    check = next(c for c in report.checks if c.name == "special tokens")
    assert check.status == "fail" and "eos_token_id differs: config.json=7, generation_config.json=8" in check.detail


def test_expect_regex_and_short_parity_are_enforced(converted) -> None:
    _, ckpt, _, out = converted
    report = run_smoke(out, prompts=[Prompt("x", expect=r"^this will not match$")], parity=False, max_new_tokens=3)
    assert report.status == "fail" and not report.generations[0].passed
    with pytest.raises(HubconvError, match="at least 64 positions"):
        run_smoke(out, native=("torchtitan", ckpt), positions=20)


def test_cli_exit_codes(converted) -> None:
    _, _, _, out = converted
    ok = subprocess.run(
        [sys.executable, "-m", "hubconv", "smoke", out, "--max-new-tokens", "4", "--json"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["parity"]["passed"] is True  # checkpoint found through hubconv.json
    w = load_file(os.path.join(out, "model.safetensors"))
    w["model.norm.weight"] = torch.full_like(w["model.norm.weight"], float("inf"))
    save_file(w, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    bad = subprocess.run(
        [sys.executable, "-m", "hubconv", "smoke", out, "--max-new-tokens", "4"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "❌" in bad.stdout


EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny-llama3-torchtitan"
)


def _smoke_on_terminal(out: str) -> str:
    """Run `hubconv smoke` with stderr on a pseudo-terminal; what the terminal received."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws nothing 0 wide
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    cmd = [sys.executable, "-m", "hubconv", "smoke", out, "--max-new-tokens", "2"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=slave, timeout=300)
    os.close(slave)
    reader.join(timeout=30)
    os.close(master)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


def test_no_carriage_return_progress_bars_when_stderr_is_not_a_terminal(tmp_path) -> None:
    """Issue 9, clean logs in Actions: the example's smoke, stderr on a pipe, has no '\\r' bar redraws."""
    out = str(tmp_path / "hf")
    conv = subprocess.run(
        [
            *(sys.executable, "-m", "hubconv", "convert", "--adapter", "torchtitan", "--quiet", "--output", out),
            *("--checkpoint", os.path.join(EXAMPLE, "step-800")),
            *("--model-args", os.path.join(EXAMPLE, "model_args.yaml")),
        ],
        capture_output=True,
        text=True,
    )
    assert conv.returncode == 0, conv.stderr
    piped = subprocess.run(
        [sys.executable, "-m", "hubconv", "smoke", out, "--max-new-tokens", "2"], capture_output=True, text=True
    )
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "\r" not in piped.stdout
    assert "Loading weights" not in piped.stderr
    # Negative control: on a terminal the same run draws transformers' bar, redrawn with '\r'.
    on_tty = _smoke_on_terminal(out)
    assert "Loading weights" in on_tty and "\r" in on_tty.replace("\r\n", "\n")


def test_library_progress_bars_follow_the_stream(monkeypatch) -> None:
    import io

    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    from hubconv.progress_bars import quiet_library_progress_bars

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    hf_logging.enable_progress_bar()
    try:
        assert quiet_library_progress_bars(Terminal()) is False and hf_logging.is_progress_bar_enabled()
        assert quiet_library_progress_bars(io.StringIO()) is True
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
