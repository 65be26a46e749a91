"""`hubconv import --model REPO_ID[@REVISION]` from the loopback Hub, through the command line."""

from __future__ import annotations

import json
import os
import re

import pytest

from hubconv.convert import convert
from hubconv.devhub import DevHub
from hubconv.hub import push
from hubconv.io.checkpoint import open_checkpoint
from tests.helpers import hubconv
from tests.native import torchtitan_llama3 as tt

pytestmark = [
    pytest.mark.usefixtures("loopback_hub_client"),
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]


def _hf_folder(tmp_path, seed: int) -> str:
    a = tt.TitanArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256)
    ckpt = str(tmp_path / f"step-{seed}")
    tt.save_dcp(ckpt, tt.random_state_dict(a, seed=seed))
    out = str(tmp_path / f"hf-{seed}")
    user = {"n_heads": 4, "rope_theta": a.rope_theta, "rope_scaling_args": None, "max_seq_len": 256}
    convert("torchtitan", ckpt, out, model_args=user, progress=False)
    return out


@pytest.fixture
def hub(tmp_path):
    with DevHub(str(tmp_path / "hubdata"), orgs=("org",)) as server:
        yield server


def _env(tmp_path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def test_import_by_repo_id_and_tag(hub, tmp_path) -> None:
    """v1.0 and main hold different weights: the tag's commit is the one imported, into the normal HF cache."""
    first, second = _hf_folder(tmp_path, 1), _hf_folder(tmp_path, 2)
    v1 = push(first, "org/tiny", endpoint=hub.url, token=hub.token, tag="v1.0")
    main = push(second, "org/tiny", endpoint=hub.url, token=hub.token)
    assert v1.commit_sha != main.commit_sha
    out = str(tmp_path / "tt")
    env = _env(tmp_path, hub.token)
    r = hubconv("import", "--adapter", "torchtitan", "--model", "org/tiny@v1.0", "--endpoint", hub.url,
                "--output", out, "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["source"]["commit"] == v1.commit_sha and report["source"]["revision"] == "v1.0"
    assert report["source"]["folder"].startswith(str(tmp_path / "hf-home" / "hub"))
    assert report["parity"]["status"] == "pass"
    assert json.load(open(os.path.join(out, "import.json")))["source"]["commit"] == v1.commit_sha
    with open_checkpoint(os.path.join(out, "checkpoint")) as native, open_checkpoint(first) as hf:
        emb = native.tensors["tok_embeddings.weight"].read_rows(0, 4)
        assert (emb == hf.tensors["model.embed_tokens.weight"].read_rows(0, 4)).all()
    # without a revision: main (the second model), from the same cache
    out2 = str(tmp_path / "tt-main")
    r = hubconv("import", "--adapter", "torchtitan", "--model", "org/tiny", "--endpoint", hub.url,
                "--output", out2, "--no-verify", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["source"]["commit"] == main.commit_sha


@pytest.mark.parametrize(
    ("model", "token", "message"),
    [
        ("org/missing", "good", r"^hubconv: error: --model org/missing: no such model repo on http://127\.0\.0\.1:\d+"),
        ("org/tiny", "hf_wrongwrongwrongwrong", r"^hubconv: error: --model org/tiny: .* refused HF_TOKEN \(HTTP 401"),
        ("org/tiny@v9", "good", r"^hubconv: error: --model org/tiny@v9: revision 'v9' does not exist"),
    ],
)
def test_hub_failures_are_one_line(hub, tmp_path, model, token, message) -> None:
    push(_hf_folder(tmp_path, 1), "org/tiny", endpoint=hub.url, token=hub.token)
    env = _env(tmp_path, hub.token if token == "good" else token)
    out = str(tmp_path / "out")
    r = hubconv("import", "--adapter", "torchtitan", "--model", model, "--endpoint", hub.url, "--output", out, env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(message, lines[0]), r.stderr
    assert "hf_wrong" not in r.stderr and not os.path.exists(out)
