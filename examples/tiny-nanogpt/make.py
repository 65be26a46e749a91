"""Rebuild the tiny nanoGPT example: a char-level GPT trained briefly on Shakespeare's Sonnet 18.

    .venv/bin/python examples/tiny-nanogpt/make.py      # from the repository root

Writes what a nanoGPT repository holds after `python data/sonnets_char/prepare.py` and
`python train.py config/train_sonnets_char.py --compile=True`:

- `data/sonnets_char/meta.pkl`: the character vocabulary ({vocab_size, itos, stoi});
- `out-sonnets-char/ckpt.pt`: train.py's checkpoint ({model, optimizer, model_args, iter_num,
  best_val_loss, config}), keys with torch.compile's `_orig_mod.` prefix, config.dataset naming
  `sonnets_char` so hubconv finds the meta.pkl as nanoGPT's sample.py does.

The model is nanoGPT's architecture as re-implemented in tests/native/nanogpt.py (2 layers, 4 heads,
width 32, block_size 128), trained for a few hundred AdamW steps on CPU.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
from tests.native import nanogpt as N  # noqa: E402

STEPS, BATCH, BLOCK = 400, 16, 128


def main() -> None:
    text = open(os.path.join(HERE, "corpus.txt"), encoding="utf-8").read()
    chars = "".join(sorted(set(text)))
    os.makedirs(os.path.join(HERE, "data", "sonnets_char"), exist_ok=True)
    N.save_meta(os.path.join(HERE, "data", "sonnets_char", "meta.pkl"), chars)
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text])
    model = N.build(seed=0, vocab_size=len(chars), block_size=BLOCK, n_layer=2, n_head=4, n_embd=32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(STEPS):
        starts = torch.randint(0, len(data) - BLOCK - 1, (BATCH,), generator=g)
        x = torch.stack([data[s : s + BLOCK] for s in starts])
        y = torch.stack([data[s + 1 : s + BLOCK + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    out = os.path.join(HERE, "out-sonnets-char")
    os.makedirs(out, exist_ok=True)
    config = {"out_dir": "out-sonnets-char", "dataset": "sonnets_char", "max_iters": STEPS, "learning_rate": 3e-3}
    N.save_ckpt(model, os.path.join(out, "ckpt.pt"), compiled=True, extra_config=config)
    print(f"{len(chars)} characters, final training loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
