"""NeMo `.nemo` archives, read in place: an uncompressed tar holding `model_config.yaml` and the weights.

Weights are `model_weights.ckpt` (one torch.save state dict), or one per rank: `mp_rank_XX/model_weights.ckpt`
(tensor parallel) or `tp_rank_XX_pp_rank_YYY/model_weights.ckpt` (tensor x pipeline parallel). Each is a
torch.save zip inside the tar, read with the torch-free reader at its window, so tensors are segments of
the `.nemo` file itself. The result follows `hubconv.io.ranks` (per-rank prefixes `mp_rank_01/` or
`tp_rank_01_pp_rank_000/` when there are several ranks) and `values["model_config"]` holds the parsed
YAML (read with hubconv.safe_yaml's bounds). Other members (tokenizer files) are listed in
`values["members"]` so an adapter can find, e.g., the SentencePiece model.
"""

from __future__ import annotations

import re

from hubconv import safe_yaml
from hubconv.errors import CheckpointError, HubconvError
from hubconv.io import ranks
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tar_members import Member, read_member, tar_index
from hubconv.io.torch_file import open_torch_zip

CONFIG = "model_config.yaml"
WEIGHTS = "model_weights.ckpt"
_TP = re.compile(r"mp_rank_(\d{2})")
_TP_PP = re.compile(r"tp_rank_(\d{2})_pp_rank_(\d{3})")


def _rank(folder: str) -> ranks.Rank | None:
    if m := _TP.fullmatch(folder):
        return ranks.Rank(int(m[1]), 0, folder)
    if m := _TP_PP.fullmatch(folder):
        return ranks.Rank(int(m[1]), int(m[2]), folder)
    return None


def _weights(path: str, members: dict[str, Member]) -> list[tuple[ranks.Rank, Member]]:
    if WEIGHTS in members:
        return [(ranks.Rank(0, 0, ""), members[WEIGHTS])]
    found = []
    for name, member in members.items():
        folder, _, leaf = name.rpartition("/")
        if leaf == WEIGHTS and "/" not in folder:
            rank = _rank(folder)
            if rank is None:
                raise CheckpointError(
                    f"{path}: unexpected weights member {name!r} (not mp_rank_XX/ or tp_rank_XX_pp_rank_YYY/)"
                )
            found.append((rank, member))
    if not found and any(n.startswith("model_weights/") for n in members):
        raise CheckpointError(
            f"{path}: .nemo archive holds a distributed (torch_dist) checkpoint in model_weights/; extract the "
            "archive (tar -xf) and pass its model_weights folder"
        )
    if not found:
        raise CheckpointError(f"{path}: .nemo archive has no {WEIGHTS} member (nor mp_rank_XX/{WEIGHTS})")
    styles = {r.folder[:3] for r, _ in found}
    if len(styles) > 1:
        raise CheckpointError(f"{path}: .nemo archive mixes mp_rank_XX/ and tp_rank_XX_pp_rank_YYY/ weights")
    pp_style = styles == {"tp_"}

    def name(tp: int, pp: int) -> str:
        return f"{f'tp_rank_{tp:02d}_pp_rank_{pp:03d}' if pp_style else f'mp_rank_{tp:02d}'}/{WEIGHTS}"

    ranks.check_complete([r for r, _ in found], path, name)
    return found


def is_tar(path: str, head: bytes) -> bool:
    """An uncompressed (POSIX or GNU) tar: `ustar` at offset 257, past the sniff window, so read here."""
    try:
        with open(path, "rb") as f:
            f.seek(257)
            return f.read(5) == b"ustar"
    except OSError:
        return False


def open_nemo(path: str) -> Checkpoint:
    """The weights of a `.nemo` archive as lazy tensors, its `model_config.yaml` in `values["model_config"]`."""
    members = tar_index(path)
    if CONFIG not in members:
        raise CheckpointError(f"{path}: .nemo archive has no {CONFIG} member")
    raw = read_member(path, members[CONFIG], safe_yaml.MAX_BYTES)
    try:
        config = safe_yaml.load_text(raw.decode("utf-8-sig"), f"{path}: {CONFIG}")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: {CONFIG} is not UTF-8 text") from None
    except HubconvError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: {CONFIG} is not a mapping")
    opened: list[tuple[ranks.Rank, Checkpoint]] = []
    try:
        for rank, member in _weights(path, members):
            opened.append((rank, open_torch_zip(path, member.offset, member.size, name=f"{path}: {member.name}")))
    except BaseException:
        for _, ckpt in opened:
            ckpt.close()
        raise
    others = sorted(n for n in members if n != CONFIG and not n.endswith(WEIGHTS))
    return ranks.merge(path, "nemo", opened, {"model_config": config, "members": others})
