"""`hubconv import`: a Hub model (or an HF folder) -> a native training checkpoint, streamed, atomic, verified.

1. Source: a local HF folder, or `REPO_ID[@REVISION]` downloaded with huggingface_hub's `snapshot_download` into
   the normal cache (resumable; `--endpoint` / `HF_ENDPOINT`, token from `HF_TOKEN` as for push). Only the files
   an import reads are fetched (config, safetensors, tokenizer).
2. Arguments: the adapter's native hyperparameters from `config.json` (the adapter's `native_args_from_hf` hook,
   else its `hubconv.import_formats` entry); HF features the native architecture lacks are refused by name.
3. Mapping: the adapter's rule table run backwards (every exact rule's recorded inverse); the few lossy forward
   steps have an explicit inverse here (re-padded vocabulary rows, reported) or are refused; HF tensors the native
   model has no place for are refused, a tied head is reported as dropped.
4. Writing: into a staging folder next to the output, tensor by tensor (kernel copies where bytes need no
   transform), renamed into place only after the verification passed.
5. Verification: the written checkpoint is read back through the adapter's own reader and convert-path argument
   resolution, and its native reference forward is compared with the transformers model's logits (float32,
   >= 64 positions: max |diff| <= 1e-4 and identical argmax). The report is printed and written as `import.json`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hubconv.adapters import registry
from hubconv.adapters.generic import RuleAdapter, same_data
from hubconv.atomic import prepare_output, publish_dir, staging_dir
from hubconv.dtypes import DType, parse_user_dtype
from hubconv.errors import CheckpointError, HubconvError, MappingError, ModelArgsError, OutputError
from hubconv.import_formats import FORMATS, ImportFormat, NativeModel
from hubconv.io.checkpoint import Checkpoint
from hubconv.io.tensor import LazyTensor, nbytes

REPORT = "import.json"
MAX_ABS_DIFF = 1e-4
MIN_POSITIONS = 64
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "vocab.txt", "*.tiktoken"]
_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


@dataclass
class Source:
    folder: str
    model: str
    revision: str | None = None  # as asked (tag, branch or sha)
    commit: str | None = None  # the commit downloaded


@dataclass
class ImportResult:
    adapter: str
    source: dict[str, Any]
    output: str
    files: dict[str, int]
    native_args: dict[str, Any]
    lossy: dict[str, str]
    dropped: dict[str, str]
    parity: dict[str, Any] | None
    seconds: dict[str, float] = field(default_factory=dict)
    tp: int = 1
    pp: int = 1
    dtype: str = "auto"
    defaults_from_hubconv_json: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------ source


def split_model(model: str) -> tuple[str, str | None]:
    """`org/name@v1.0` -> ("org/name", "v1.0")."""
    repo, sep, rev = model.partition("@")
    if sep and not rev:
        raise HubconvError(f"--model {model!r}: empty revision after '@'")
    return repo, (rev or None)


def resolve_source(model: str, endpoint: str | None = None) -> Source:
    """A local HF folder as it is, else a Hub repo id downloaded (or found complete) in the huggingface_hub cache."""
    if os.path.isdir(model):
        return Source(os.path.abspath(model), model)
    repo, rev = split_model(model)
    if not _REPO_ID.match(repo):
        if os.path.exists(model):
            raise CheckpointError(f"--model {model}: not a folder (an HF model folder or a Hub repo id is expected)")
        raise HubconvError(f"--model {model!r}: no such folder, and not a Hub repo id 'namespace/name[@revision]'")
    return download(repo, rev, endpoint)


def download(repo: str, revision: str | None, endpoint: str | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from hubconv.credentials import check_repo_id, clean_token, redact_url
    from hubconv.hub import _no_xet_on_loopback, _reason, hub_endpoint
    from hubconv.progress_bars import quiet_library_progress_bars

    check_repo_id(repo, "--model")
    url = hub_endpoint(endpoint)
    token = clean_token(os.environ.get("HF_TOKEN"), "HF_TOKEN")
    _no_xet_on_loopback(url)
    quiet_library_progress_bars()
    shown = f"{repo}@{revision}" if revision else repo
    where = redact_url(url)
    try:
        path = snapshot_download(repo, revision=revision, endpoint=url, token=token, allow_patterns=HUB_PATTERNS)
    except RevisionNotFoundError:
        raise HubconvError(f"--model {shown}: revision {revision!r} does not exist on {where}") from None
    except GatedRepoError:
        raise HubconvError(f"--model {shown}: gated repo on {where}; accept its terms and set HF_TOKEN") from None
    except RepositoryNotFoundError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if token and status == 401:
            raise HubconvError(f"--model {shown}: {where} refused HF_TOKEN (HTTP 401: invalid credentials)") from None
        hint = "" if token else " (if it is private, set HF_TOKEN)"
        raise HubconvError(f"--model {shown}: no such model repo on {where}{hint}") from None
    except LocalEntryNotFoundError as e:
        raise HubconvError(f"--model {shown}: cannot download from {where}: {_reason(e)}") from None
    except (HfHubHTTPError, OSError) as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status == 401:
            raise HubconvError(f"--model {shown}: {where} refused HF_TOKEN (HTTP 401: invalid credentials)") from None
        raise HubconvError(f"--model {shown}: download from {where} failed: {_reason(e)}") from None
    return Source(path, repo, revision, os.path.basename(path))


def open_hf(src: Source) -> Checkpoint:
    """The HF model's safetensors, lazily. A Hub snapshot's files are symlinks into the cache repo's `blobs/`: each
    must resolve inside that cache repo folder (`models--ns--name`), and is opened by its real path."""
    from hubconv.io.checkpoint import open_checkpoint
    from hubconv.io.paths import confined
    from hubconv.io.safetensors_reader import open_safetensors

    if src.commit is None:
        return open_checkpoint(src.folder)
    root = os.path.dirname(os.path.dirname(src.folder))
    names = sorted(n for n in os.listdir(src.folder) if n.endswith(".safetensors"))
    if not names:
        raise CheckpointError(f"--model {src.model}: the repo has no *.safetensors weights")
    merged = Checkpoint(path=src.folder, format="safetensors", tensors={})
    for n in names:
        rel = os.path.relpath(os.path.join(src.folder, n), root)
        part = open_safetensors(confined(root, rel, f"{src.folder}/{n}: file"))
        merged.closers.extend(part.closers)
        for k, t in part.tensors.items():
            if k in merged.tensors:
                merged.close()
                raise CheckpointError(f"{src.folder}: tensor {k!r} appears in more than one file")
            merged.tensors[k] = t
    return merged


def record_defaults(folder: str, adapter: str, fmt: ImportFormat) -> dict[str, Any]:
    """Defaults from the folder's `hubconv.json` when hubconv converted it from this same framework (a model going
    back where it came from keeps its key names, padding, fusion); anything unreadable there is ignored."""
    path = os.path.join(folder, "hubconv.json")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(record, dict)
        or record.get("adapter") != adapter
        or not isinstance(record.get("native_args"), dict)
    ):
        return {}
    try:
        return fmt.defaults_from_record(record["native_args"])
    except (KeyError, TypeError, ValueError):
        return {}


def read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder}: no config.json (an HF transformers model folder is expected)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


# ----------------------------------------------------------------------------------------------------- mapping


def import_format(adapter_name: str) -> ImportFormat:
    fmt = FORMATS.get(adapter_name)
    if fmt is None:
        import_hooks()
        fmt = FORMATS.get(adapter_name)
    if fmt is None:
        raise HubconvError(
            f"--adapter {adapter_name}: import is not supported for this adapter "
            f"(supported: {', '.join(sorted(FORMATS))})"
        )
    return fmt


def import_hooks() -> None:
    """Import modules that register more import formats (adapters landing later register themselves)."""
    import importlib

    for module in ("hubconv.import_megatron", "hubconv.import_litgpt", "hubconv.import_mindformers"):
        try:
            importlib.import_module(module)
        except ImportError:
            continue


def native_args(
    adapter: RuleAdapter,
    fmt: ImportFormat,
    config: Mapping[str, Any],
    hf: Mapping[str, LazyTensor],
    user: Mapping[str, Any],
    tp: int,
    pp: int,
) -> dict[str, Any]:
    hook = getattr(adapter, "native_args_from_hf", None)
    if hook is not None:
        return dict(hook(config, hf, user))
    fmt.check_user(user)
    return fmt.args_from_hf(config, hf, user, tp, pp)


def map_to_native(
    adapter: RuleAdapter, fmt: ImportFormat, hf: Mapping[str, LazyTensor], args: dict[str, Any]
) -> NativeModel:
    """HF tensors -> native tensors through the adapter's rule table backwards; lossy steps and leftovers handled."""
    table = adapter.table(args)
    _, _, records = table.apply(adapter.native_shapes(args), args, where="native layout")
    model = NativeModel(tensors=[], args=args)
    hf = dict(hf)
    tie = adapter.tied_keys(args) if adapter.tied(args) else None
    used: set[str] = set()
    for rec in records:
        used.update(rec.targets)
        if rec.inverse is not None:
            model.tensors.extend(table.invert(hf, [rec], where="HF model"))
        else:
            out = fmt.lossy_inverse(rec, hf, args)
            for t in out:
                if len(rec.targets) == 1 and rec.targets[0] in hf and t.shape == hf[rec.targets[0]].shape:
                    continue  # nothing to re-add (e.g. a vocabulary already at its padded size)
                model.lossy[t.name] = "; ".join(rec.lossy) + " (inverse: " + _lossy_note(t, hf, rec) + ")"
            if not out:
                why = f"{rec.rule.describe()}: the native model has no such tensor ({'; '.join(rec.lossy)})"
                model.dropped.update({t: why for t in rec.targets})
            model.tensors.extend(out)
    leftovers = sorted(set(hf) - used)
    for key in leftovers:
        if tie and key == "lm_head.weight":
            emb = _hf_embedding(records, tie[0])
            if emb in hf and not same_data(hf[key], hf[emb]):
                raise MappingError(f"HF model: {key} differs from {emb} although config.json ties them")
            model.dropped[key] = "tied to the embeddings (tie_word_embeddings)"
        elif key.endswith(("rotary_emb.inv_freq", ".attn.masked_bias", ".attn.bias")):
            model.dropped[key] = "buffer recomputed by the native model"
        else:
            raise MappingError(
                f"HF model: tensor {key} has no place in the {adapter.name} layout (feature not supported)"
            )
    model.tensors = fmt.finish(model.tensors, args)
    return model


def _hf_embedding(records: list[Any], native_emb: str) -> str:
    return next((r.targets[0] for r in records if r.sources == [native_emb]), native_emb)


def _lossy_note(t: LazyTensor, hf: Mapping[str, LazyTensor], rec: Any) -> str:
    src = hf.get(rec.targets[0])
    if src is not None and src.shape and t.shape and t.shape[0] > src.shape[0]:
        return f"rows {src.shape[0]}..{t.shape[0] - 1} re-added as zeros"
    return "rebuilt"


# ---------------------------------------------------------------------------------------------------- verifying


def verify(
    adapter: RuleAdapter,
    fmt: ImportFormat,
    model: NativeModel,
    staging: str,
    hf_dir: str,
    config: Mapping[str, Any],
    positions: int,
) -> dict[str, Any]:
    """Native reference forward on the written checkpoint vs transformers on the HF model (float32)."""
    import torch

    from hubconv.progress_bars import quiet_library_progress_bars
    from hubconv.smoke import parity_positions

    quiet_library_progress_bars()
    with adapter.open(fmt.reopen_path(staging)) as ckpt:
        family = adapter.detect_family(ckpt)
        plan = adapter.plan(ckpt, family, adapter.load_args(fmt.reopen_args(model, config)))
        max_pos = int(config.get("max_position_embeddings") or config.get("n_positions") or positions)
        seq = min(max(positions, MIN_POSITIONS), max_pos)
        batch = math.ceil(max(positions, MIN_POSITIONS) / seq)
        vocab = int(config["vocab_size"])
        tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(20260501))
        pos = parity_positions(seq, max_pos)
        ref = adapter.reference_logits(ckpt, plan.native_args, tokens, pos)
    if ref is None:
        return {"status": "skipped", "reason": f"adapter {adapter.name} has no native reference forward"}
    # With --dtype the native weights were rounded to it: the transformers model gets the same rounding, and both
    # compute in float32.
    got, mode = _hf_logits(hf_dir, model, tokens, pos)
    ref = ref.float()
    if ref.shape != got.shape:
        raise HubconvError(f"parity: native logits {list(ref.shape)} vs transformers {list(got.shape)}")
    diff = (ref - got).abs()
    same_argmax = bool((ref.argmax(-1) == got.argmax(-1)).all())
    max_diff = float(diff.max())
    return {
        "status": "pass" if max_diff <= MAX_ABS_DIFF and same_argmax else "fail",
        "positions": int(batch * seq),
        "sequences": batch,
        "max_position": int(pos[-1]),
        "max_abs_diff": max_diff,
        "threshold": MAX_ABS_DIFF,
        "argmax_identical": same_argmax,
        "dtype": "float32",
        "transformers_load": mode,
    }


def _hf_logits(hf_dir: str, model: NativeModel, tokens: Any, pos: Any) -> tuple[Any, str]:
    """Float32 logits of the HF model: loaded whole when small, else run through transformers' own forward one
    module at a time (hubconv.streamed_forward), so verifying a large import needs about one layer of memory.
    With --dtype the HF weights are first rounded to that dtype, which only the full load does."""
    import torch
    from transformers import AutoModelForCausalLM

    from hubconv.smoke import _mem_available
    from hubconv.streamed_forward import FileWeights, StreamedModel, choose_mode, weights_bytes

    if model.dtype is None:
        weights = FileWeights(hf_dir)
        if choose_mode("auto", weights_bytes(weights, "float32"), _mem_available()) == "stream":
            streamed = StreamedModel(hf_dir, weights, dtype="float32")  # closes `weights` with it
            try:
                with torch.no_grad():
                    return streamed.logits(tokens, pos).float(), "streamed"
            finally:
                streamed.close()
        weights.close()
    dtype = getattr(torch, model.dtype.torch_name) if model.dtype is not None else torch.float32
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, local_files_only=True).float().eval()
    with torch.no_grad():
        got = hf_model(tokens, position_ids=pos[None].expand(tokens.shape[0], -1)).logits.float()
    return got, "full"


# ------------------------------------------------------------------------------------------------------- import


def _files(folder: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = os.path.getsize(p)
    return dict(sorted(out.items()))


def import_model(
    adapter_spec: str,
    model: str,
    output: str,
    *,
    model_args: str | Mapping[str, Any] | None = None,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    endpoint: str | None = None,
    overwrite: bool = False,
    verify_parity: bool = True,
    positions: int = 96,
    progress: bool = True,
) -> ImportResult:
    """Import `model` (HF folder or Hub repo id[@rev]) into `output` in the adapter's native format."""
    from hubconv.model_args import load_args_file

    t0 = time.monotonic()
    adapter, _ = registry.get(adapter_spec)
    if not isinstance(adapter, RuleAdapter):
        raise HubconvError(f"--adapter {adapter_spec}: import needs a rule-based adapter")
    fmt = import_format(adapter.name)
    if tp < 1 or pp < 1:
        raise ModelArgsError(f"--tp {tp} --pp {pp}: sizes must be positive")
    if positions < MIN_POSITIONS:
        raise HubconvError(f"--positions {positions}: parity needs at least {MIN_POSITIONS} positions")
    out_dtype: DType | None = parse_user_dtype(dtype)
    user: dict[str, Any] = {}
    if isinstance(model_args, str):
        user = load_args_file(model_args)
    elif model_args:
        user = dict(model_args)
    local = model if os.path.isdir(model) else None
    prepare_output(
        output,
        overwrite,
        {"model folder": local, "model args file": model_args if isinstance(model_args, str) else None},
    )
    src = resolve_source(model, endpoint)
    t_download = time.monotonic()
    config = read_config(src.folder)
    if fmt.model_types and config.get("model_type") not in fmt.model_types:
        raise MappingError(
            f"config.json: model_type={config.get('model_type')!r} cannot be imported into {adapter.name} "
            f"(it imports {', '.join(fmt.model_types)})"
        )
    defaults = record_defaults(src.folder, adapter.name, fmt)
    user = {**defaults, **user}
    with open_hf(src) as hf_ckpt:
        hf = hf_ckpt.tensors
        args = native_args(adapter, fmt, config, hf, user, tp, pp)
        native = map_to_native(adapter, fmt, hf, args)
        native.dtype = out_dtype
        staging = staging_dir(output, "import")
        need = sum(nbytes(t) for t in native.tensors) + (16 << 20)
        free = shutil.disk_usage(os.path.dirname(staging)).free
        if free < need:
            raise OutputError(
                f"{output}: not enough free disk space: the import needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free"
            )
        if os.path.exists(staging):
            shutil.rmtree(staging)
        os.makedirs(staging)
        try:
            bar = _progress_bar(sum(nbytes(t) for t in native.tensors), progress)
            try:
                fmt.write(staging, native, src.folder, bar.update)
            finally:
                bar.close()
            t_write = time.monotonic()
            parity = verify(adapter, fmt, native, staging, src.folder, config, positions) if verify_parity else None
            t_verify = time.monotonic()
            if parity and parity["status"] == "fail":
                raise HubconvError(
                    f"parity failed: max |diff| {parity['max_abs_diff']:.3g} (limit {MAX_ABS_DIFF}), "
                    f"argmax identical: {parity['argmax_identical']}; nothing was written to {output}"
                )
            result = ImportResult(
                adapter=adapter.name,
                source={"model": src.model, "revision": src.revision, "commit": src.commit, "folder": src.folder},
                output=os.path.abspath(output),
                files={},
                native_args={k: v for k, v in native.args.items()},
                defaults_from_hubconv_json=defaults,
                lossy=native.lossy,
                dropped=native.dropped,
                parity=parity,
                seconds={
                    "download": round(t_download - t0, 3),
                    "write": round(t_write - t_download, 3),
                    "verify": round(t_verify - t_write, 3),
                },
                tp=tp,
                pp=pp,
                dtype=dtype,
            )
            result.files = _files(staging)
            result.files[REPORT] = 0
            with open(os.path.join(staging, REPORT), "w") as f:
                json.dump(result.to_json(), f, indent=2, default=str)
                f.write("\n")
            result.files[REPORT] = os.path.getsize(os.path.join(staging, REPORT))
            publish_dir(staging, output)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return result


def _progress_bar(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="importing", disable=not show or None)
