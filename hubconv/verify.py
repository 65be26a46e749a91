"""Round-trip proof after a push: download the commit with the real client, load it, generate."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from hubconv.progress_bars import quiet_library_progress_bars


def generate_ids(model_dir: str, prompt: str, max_new_tokens: int = 16) -> list[int]:
    """Greedy continuation ids of `prompt` with the model and tokenizer in `model_dir` (offline)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_library_progress_bars()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1] :].tolist()


def verify_download(
    repo_id: str,
    revision: str,
    endpoint: str,
    token: str,
    local_dir: str,
    prompt: str,
    max_new_tokens: int = 16,
    ignore: frozenset[str] = frozenset(),
    compare_generation: bool = True,
) -> dict[str, Any]:
    """snapshot_download `revision`, compare bytes with `local_dir` (but `ignore`), and generate from both
    (from the download only when `compare_generation` is false: streamed shards are not kept locally)."""
    from huggingface_hub import snapshot_download

    quiet_library_progress_bars()
    from hubconv.credentials import redact_url
    from hubconv.hub import hub_errors

    with tempfile.TemporaryDirectory(prefix="hubconv-verify-") as tmp:
        with hub_errors(f"downloading {repo_id}@{revision} from {redact_url(endpoint)} failed"):
            path = snapshot_download(repo_id, revision=revision, endpoint=endpoint, token=token, local_dir=tmp)
        mismatched = []
        for name in sorted(os.listdir(local_dir)):
            local = os.path.join(local_dir, name)
            if os.path.isfile(local) and name not in ignore:
                remote = os.path.join(path, name)
                if not os.path.isfile(remote) or open(remote, "rb").read() != open(local, "rb").read():
                    mismatched.append(name)
        downloaded = generate_ids(path, prompt, max_new_tokens)
    original = generate_ids(local_dir, prompt, max_new_tokens) if compare_generation else downloaded
    return {
        "files_identical": not mismatched,
        "mismatched_files": mismatched,
        "same_generation": downloaded == original,
        "generation_compared": compare_generation,
        "generated_ids": downloaded,
    }
