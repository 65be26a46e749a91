"""Logits parity between the native reference forward (tests/native) and a converted HF folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tests.native import torchtitan_llama3 as tt


@dataclass
class Parity:
    positions: int
    max_abs_diff: float
    argmax_agreement: float
    first_bad_position: int | None

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= 1e-4 and self.argmax_agreement == 1.0

    def __str__(self) -> str:
        return (
            f"positions={self.positions} max_abs_logit_diff={self.max_abs_diff:.3g} "
            f"argmax_agreement={self.argmax_agreement:.4f} first_bad_position={self.first_bad_position}"
        )


def fixed_tokens(vocab: int, n: int = 96, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def compare(ref: torch.Tensor, got: torch.Tensor) -> Parity:
    diff = (ref.float() - got.float()).abs().amax(dim=-1)[0]  # per position
    agree = ref.argmax(-1)[0] == got.argmax(-1)[0]
    bad = ((diff > 1e-4) | ~agree).nonzero()
    return Parity(ref.shape[1], float(diff.max()), float(agree.float().mean()), int(bad[0]) if len(bad) else None)


def hf_logits(model_dir: str, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float(), info


def titan_args(native: dict[str, Any]) -> tt.TitanArgs:
    """hubconv's resolved native args -> the reference's TitanArgs."""
    return tt.TitanArgs(
        dim=native["dim"],
        n_layers=native["n_layers"],
        n_heads=native["n_heads"],
        n_kv_heads=native["n_kv_heads"],
        vocab_size=native["vocab_size"],
        norm_eps=native["norm_eps"],
        rope_theta=native["rope_theta"],
        max_seq_len=native["max_seq_len"],
        rope_scaling=native["rope_scaling_args"],
        tie_word_embeddings=native["tie_word_embeddings"],
    )


def check_dir(checkpoint: str, hf_dir: str, native: dict[str, Any], positions: int = 96) -> Parity:
    sd = {k: v for k, v in tt.read_dcp(checkpoint).items() if isinstance(v, torch.Tensor)}
    args = titan_args(native)
    tokens = fixed_tokens(args.vocab_size, positions)
    ref = tt.forward(sd, args, tokens)
    got, info = hf_logits(hf_dir, tokens)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise AssertionError(f"transformers reported loading problems: {problems}")
    return compare(ref, got)
