"""Train the tiny tutorial GPT of this folder and save what its training script would: a plain state dict.

    python examples/tutorial-gpt/make_checkpoint.py            # writes ckpt.pt and meta.pkl here (~400 KB)
    python examples/tutorial-gpt/make_checkpoint.py --llama    # also llama.pt for mapping-llama.yml

The corpus is the bundled example's public-domain text (../tiny-llama3-torchtitan/corpus.txt), tokenized per
character as in the tutorial; `meta.pkl` holds that vocabulary in nanoGPT's format ({vocab_size, itos, stoi}),
which `hubconv release` turns into a tokenizer. The functions are also used by the tests (random weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "tiny-llama3-torchtitan", "corpus.txt")
# Tiny but complete: two layers, four heads (so the q scale n_head**-0.5 = 0.5 is exact), 96 positions.
TUTORIAL = {"n_embd": 32, "n_head": 4, "n_layer": 2, "block_size": 96}
LLAMA = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "hidden": 96, "rope_theta": 1e4, "max_seq_len": 512}


def load_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"tutorial_gpt_{name}", os.path.join(HERE, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so a mapping that mixes up any tensor shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if name.endswith("weight") and p.dim() == 1 else noise)
    return model


def tutorial_model(vocab_size: int, *, seed: int = 0, lm_head_bias: bool = False, **over: Any) -> torch.nn.Module:
    cls = load_module("model").GPTLanguageModel
    return randomize(cls(vocab_size, **{**TUTORIAL, **over}, dropout=0.0, lm_head_bias=lm_head_bias), seed).eval()


def llama_model(vocab_size: int, *, seed: int = 0, **over: Any) -> torch.nn.Module:
    return randomize(load_module("llama_model").TinyLlama(vocab_size, **{**LLAMA, **over}), seed).eval()


def save_llama(model: torch.nn.Module, path: str) -> None:
    """The checkpoint layout mapping-llama.yml reads: the state dict under "model", the hyperparameters beside it."""
    attn = model.blocks[0].attn
    config = {"n_heads": attn.n_heads, "rope_theta": attn.theta, "max_seq_len": model.max_seq_len}
    torch.save({"model": model.state_dict(), "config": config}, path)


def train(text: str, steps: int, seed: int = 1337) -> tuple[torch.nn.Module, dict[str, Any]]:
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    torch.manual_seed(seed)
    model = load_module("model").GPTLanguageModel(len(chars), **TUTORIAL, dropout=0.0, lm_head_bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    block = TUTORIAL["block_size"]
    for step in range(steps):
        ix = torch.randint(len(data) - block - 1, (16,))
        x = torch.stack([data[i : i + block] for i in ix])
        y = torch.stack([data[i + 1 : i + block + 1] for i in ix])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    return model.eval(), meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", default=HERE)
    parser.add_argument("--llama", action="store_true", help="also write llama.pt (random weights)")
    args = parser.parse_args()
    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()
    model, meta = train(text, args.steps)
    torch.save(model.state_dict(), os.path.join(args.out, "ckpt.pt"))
    with open(os.path.join(args.out, "meta.pkl"), "wb") as f:
        pickle.dump(meta, f)
    if args.llama:
        save_llama(llama_model(meta["vocab_size"]), os.path.join(args.out, "llama.pt"))
    print(f"wrote ckpt.pt and meta.pkl to {args.out}")


if __name__ == "__main__":
    main()
