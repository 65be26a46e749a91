"""`hubconv smoke DIR`: prove a converted folder works in transformers, and matches the native model.

Checks, each recorded in `smoke.json` (published with the model) and `smoke.md`:
- loading with `AutoModelForCausalLM` offline reports no missing, unexpected or mismatched keys;
- greedy generation from each prompt yields finite logits and non-empty text, matching the
  prompt's `expect` regex when given;
- parity, when the adapter has a reference forward of the native architecture and the native
  checkpoint is at hand: logits on >= 64 fixed positions compared by max abs difference, KL
  divergence and top-1 agreement (RoPE layout bugs often only show after ~20 tokens).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from hubconv import __version__
from hubconv.checks import Check
from hubconv.config import Prompt
from hubconv.errors import HubconvError

if TYPE_CHECKING:
    from hubconv.streamed_forward import WeightSource

# Parity bound. The converted model runs in the smoke dtype while the native reference runs in float32,
# so a correct conversion differs by rounding only: about the dtype's epsilon, relative to the logits'
# scale (their standard deviation), growing like a random walk with depth (sqrt(n_layers)). The factors
# are calibrated by benchmarks/parity.py (correct conversions and negative controls, tiny to 1B-class).
EPSILON = {"float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
# float32 keeps 4x headroom over the calibration (a checkpoint whose hidden states grow more than our
# synthetic ones rounds more): at 1B-class the weakest float32 control is still >200x over the bound.
MAX_ABS_FACTOR = {"float32": 256.0, "bfloat16": 8.0, "float16": 8.0}
# KL ~ Var(dlogit)/2, so KL <= (max_abs / KL_SHARE)^2 / 2 asks the typical difference to stay a quarter of the worst.
KL_SHARE = 4.0


def parity_bounds(logit_scale: float, dtype: str, n_layers: int) -> dict[str, float]:
    """Bounds for a correct conversion: max |dlogit|, mean KL, top-1 agreement outside near-ties."""
    unit = EPSILON[dtype] * math.sqrt(max(n_layers, 1)) * logit_scale
    max_abs = MAX_ABS_FACTOR[dtype] * unit
    return {
        "max_abs_diff": max_abs,
        "kl_divergence": 0.5 * (max_abs / KL_SHARE) ** 2,
        "top1_agreement": 1.0,
        # A top-1 swap between reference logits closer than the bound is rounding: it does not count.
        "near_tie_margin": max_abs,
        "logit_scale": logit_scale,
        "n_layers": float(n_layers),
        "dtype_epsilon": EPSILON[dtype],
    }


@dataclass
class Generation:
    prompt: str
    output: str
    new_tokens: int
    tokens_per_second: float
    expect: str | None
    passed: bool
    seconds: float = 0.0
    requested_tokens: int = 0  # max_new_tokens asked for, when a streamed run of a large model generated fewer


@dataclass
class Parity:
    positions: int
    max_abs_diff: float
    kl_divergence: float
    top1_agreement: float
    first_divergent_position: int | None
    thresholds: dict[str, float]
    passed: bool
    near_ties: int = 0  # top-1 disagreements excused as near-ties (counted as agreements)
    max_position: int = 0  # largest position id compared
    seconds: float = 0.0  # the converted model's forward over the compared positions
    tokens_per_second: float = 0.0  # positions / seconds
    reference_seconds: float = 0.0  # the native reference forward

    @property
    def margin(self) -> float:
        """max |dlogit| / its bound: < 1 passes; the headroom (or excess) of this comparison."""
        return self.max_abs_diff / self.thresholds["max_abs_diff"]


@dataclass
class SmokeReport:
    status: str
    device: str
    dtype: str
    load_seconds: float
    loading_info: dict[str, list[str]]
    generations: list[Generation] = field(default_factory=list)
    parity: Parity | None = None
    checks: list[Check] = field(default_factory=list)
    hubconv_version: str = __version__
    # How transformers ran the model: "full" (from_pretrained), "files" (streamed layer by layer from the
    # safetensors files) or "plan" (streamed from the conversion plan: the uploaded bytes); see MODES_TEXT.
    mode: str = "full"
    mode_detail: str = ""
    costs: dict[str, float] = field(default_factory=dict)  # seconds, bytes read, passes over the weights

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Streamed generation reads every layer once per new token: for large models it stays short unless the prompt
# has an `expect` regex (parity, one pass over many positions, is the thorough check).
STREAM_LARGE_BYTES = 256 * 2**20
STREAM_GENERATION_TOKENS = 4  # per prompt without an `expect` regex (those get max_new_tokens)
MODES_TEXT = {
    "full": "full load (from_pretrained)",
    "files": "streamed layer by layer from the safetensors files",
    "plan": "streamed layer by layer from the conversion plan (the uploaded bytes, sha256-checked)",
}


def _pick_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _pick_dtype(model_dir: str, dtype: str, device: str) -> str:
    """float32 when it fits comfortably (exact parity), else the checkpoint's half dtype."""
    if dtype != "auto":
        return dtype
    with open(os.path.join(model_dir, "config.json")) as f:
        stored = json.load(f).get("dtype") or "float32"
    weight_bytes = sum(
        os.path.getsize(os.path.join(model_dir, n)) for n in os.listdir(model_dir) if n.endswith(".safetensors")
    )
    scale = 4 / (2 if stored in ("bfloat16", "float16") else 4)
    avail = _mem_available() if device == "cpu" else _cuda_free()
    return "float32" if weight_bytes * scale < 0.4 * avail else stored


def _cuda_free() -> int:
    import torch

    return int(torch.cuda.mem_get_info()[0])


def _mem_available() -> int:
    """MemAvailable (free memory plus reclaimable page cache) in bytes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _parity_tokens(vocab: int, positions: int):
    import torch

    return torch.randint(0, vocab, (1, positions), generator=torch.Generator().manual_seed(20260501))


def parity_positions(n: int, max_positions: int):
    """`n` increasing position ids: 0..n/2-1 (short contexts), then spread geometrically up to
    `max_positions` - 1, so relative distances reach the whole context: a wrong RoPE theta or
    dropped Llama 3.1 scaling (which only changes wavelengths beyond ~2k tokens) shows there."""
    import torch

    half = n // 2
    if max_positions <= n:
        return torch.arange(n)
    tail = torch.logspace(math.log10(half), math.log10(max_positions - 1), n - half, dtype=torch.float64)
    ids = list(range(half))
    for p in tail.round().long().tolist():
        ids.append(max(p, ids[-1] + 1))
    return torch.tensor(ids)


def compare_logits(ref, got, dtype: str, n_layers: int, max_position: int = 0) -> Parity:
    """Max abs diff, mean KL(native || converted) and top-1 agreement, against `parity_bounds`."""

    ref, got = ref.float().cpu()[0], got.float().cpu()[0]
    limits = parity_bounds(float(ref.std()), dtype, n_layers)
    diff = (ref - got).abs().amax(-1)
    log_p, log_q = ref.double().log_softmax(-1), got.double().log_softmax(-1)  # float64: no rounding floor
    kl_pos = (log_p.exp() * (log_p - log_q)).sum(-1).float()
    top2 = ref.topk(2, dim=-1).values
    near_tie = (top2[:, 0] - top2[:, 1]) < limits["near_tie_margin"]
    swapped = ref.argmax(-1) != got.argmax(-1)
    agree = ~swapped | near_tie
    bad = ((diff > limits["max_abs_diff"]) | (kl_pos > limits["kl_divergence"]) | ~agree).nonzero()
    result = Parity(
        positions=ref.shape[0],
        max_abs_diff=float(diff.max()),
        kl_divergence=max(0.0, float(kl_pos.mean())),  # rounding can make a zero KL slightly negative
        top1_agreement=float(agree.float().mean()),
        first_divergent_position=int(bad[0]) if len(bad) else None,
        thresholds=limits,
        passed=False,
        near_ties=int((swapped & near_tie).sum()),
        max_position=max_position,
    )
    result.passed = (
        result.max_abs_diff <= limits["max_abs_diff"]
        and result.kl_divergence <= limits["kl_divergence"]
        and result.top1_agreement >= limits["top1_agreement"]
    )
    return result


def run_smoke(
    model_dir: str,
    *,
    prompts: Sequence[Prompt] = (Prompt("The"),),
    max_new_tokens: int = 32,
    parity: bool = True,
    positions: int = 96,
    native: tuple[str, ...] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    load: str = "auto",
    weights: Callable[[], AbstractContextManager[WeightSource]] | None = None,
    progress: bool | None = None,
) -> SmokeReport:
    """Run every check on `model_dir`; `native` = (adapter spec, checkpoint[, mapping file]) enables parity.

    `load`: "full" loads the model with `from_pretrained`; "stream" runs it one module at a time
    (hubconv.streamed_forward); "auto" full-loads small models and streams the rest. `weights` opens the
    converted tensors when they are not files in `model_dir` (`release --stream-upload`: the conversion
    plan's views, `streamed_forward.plan_weights`), which implies streaming. `progress`: line-based progress of
    passes over the weights (default: for large models)."""
    # Every load below passes local_files_only=True; no process-wide HF_HUB_OFFLINE, which huggingface_hub reads
    # once at import and would keep a later push in the same process (or a child process) offline.
    from hubconv.progress_bars import quiet_library_progress_bars
    from hubconv.streamed_forward import FileWeights, choose_mode, weights_bytes

    quiet_library_progress_bars()

    if positions < 64:
        raise HubconvError("smoke: parity needs at least 64 positions (layout bugs hide in short contexts)")
    device = _pick_device(device)
    if load == "full":
        if weights is not None:
            raise HubconvError(
                "smoke: the weights are not files in the folder (streamed upload): they cannot be fully loaded"
            )
        return _run_full(model_dir, prompts, max_new_tokens, parity, positions, native, device, dtype)
    opener = weights or (lambda: contextlib.closing(FileWeights(model_dir)))
    with opener() as source:
        avail = _mem_available() if device == "cpu" else _cuda_free()
        mode = "stream" if weights is not None else choose_mode(load, weights_bytes(source, "float32"), avail)
        if mode == "stream":
            from hubconv.streamed_forward import StreamUnsupported

            try:
                return _run_streamed(
                    model_dir, source, prompts, max_new_tokens, parity, positions, native, device, dtype, progress
                )
            except StreamUnsupported as e:
                if weights is not None or load == "stream":
                    raise
                fallback = f"streamed verification unsupported ({e}): loaded fully"
        else:
            fallback = ""
    report = _run_full(model_dir, prompts, max_new_tokens, parity, positions, native, device, dtype)
    if fallback:
        report.checks.insert(0, Check("load mode", "warn", fallback))
    return report


def _run_full(
    model_dir: str,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    parity: bool,
    positions: int,
    native: tuple[str, ...] | None,
    device: str,
    dtype: str,
) -> SmokeReport:
    """The whole model loaded with `from_pretrained`, as users load it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _pick_dtype(model_dir, dtype, device)
    start = time.perf_counter()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=getattr(torch, dtype), output_loading_info=True, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise HubconvError(f"{model_dir}: transformers cannot load the model: {e}") from None
    model.to(device).eval()
    load_seconds = time.perf_counter() - start
    loading = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs"}
    report = SmokeReport(
        "pass", device, dtype, round(load_seconds, 3), loading, mode="full", mode_detail=MODES_TEXT["full"]
    )
    report.costs["load_seconds"] = round(load_seconds, 3)

    def generate(ids: Any, n: int) -> tuple[Any, bool]:
        with torch.no_grad():
            out = model.generate(
                ids.to(device),
                max_new_tokens=n,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None else None,
            )
        return out.sequences[0, ids.shape[1] :], all(bool(torch.isfinite(s).all()) for s in out.scores)

    def logits(tokens: Any, pos: Any) -> Any:
        with torch.no_grad():
            return model(tokens.to(device), position_ids=pos[None].to(device)).logits

    _run_checks(report, model, model_dir, prompts, max_new_tokens, parity, positions, native, generate, logits)
    return report


def _run_streamed(
    model_dir: str,
    source: WeightSource,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    parity: bool,
    positions: int,
    native: tuple[str, ...] | None,
    device: str,
    dtype: str,
    progress: bool | None,
) -> SmokeReport:
    """The model's own forward with one decoder layer (or embedding, norm, head) in memory at a time."""
    from hubconv.streamed_forward import StreamedModel

    dtype = "float32" if dtype == "auto" else dtype  # one layer at a time: float32 fits, and parity is exact
    start = time.perf_counter()
    streamed = StreamedModel(model_dir, source, dtype=dtype, device=device, progress=progress)
    try:
        load_seconds = time.perf_counter() - start
        mode = source.kind
        report = SmokeReport(
            "pass",
            device,
            dtype,
            round(load_seconds, 3),
            streamed.loading_info,
            mode=mode,
            mode_detail=MODES_TEXT[mode],
        )
        report.costs["load_checks_seconds"] = round(load_seconds, 3)
        if any(streamed.loading_info.values()):  # a forward over missing or misshapen weights proves nothing
            problems = {k: v for k, v in streamed.loading_info.items() if v}
            report.checks.append(Check("load", "fail", f"{problems}"))
            report.checks.append(Check("generate", "fail", "not run: the load check failed"))
            report.status = "fail"
            return report

        stored, requested = sum(t.nbytes for t in source.tensors.values()), max_new_tokens
        if stored >= STREAM_LARGE_BYTES and max_new_tokens > STREAM_GENERATION_TOKENS:
            max_new_tokens = STREAM_GENERATION_TOKENS  # recorded per generation (requested_tokens)

        def generate(ids: Any, n: int) -> tuple[Any, bool]:
            return streamed.generate(ids, n, _eos_ids(streamed.model.generation_config))

        _run_checks(
            report, streamed.model, model_dir, prompts, max_new_tokens, parity, positions, native, generate,
            streamed.logits, requested,
        )  # fmt: skip
        verified = getattr(source, "verified", None)
        if verified is not None:
            report.checks.append(
                Check(
                    "uploaded bytes",
                    "pass",
                    f"{len(verified)} tensors read through the conversion plan match the sha256 of the uploaded shards",
                )
            )
        s = streamed.stats
        report.costs.update(
            {
                "passes": s.passes,
                "bytes_read": s.bytes_loaded,
                "weights_read_seconds": round(s.load_seconds, 3),
                "largest_module_bytes": s.peak_group_bytes,
                "modules": s.groups,
            }
        )
        return report
    finally:
        streamed.close()


def _run_checks(
    report: SmokeReport,
    model: Any,
    model_dir: str,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    parity: bool,
    positions: int,
    native: tuple[str, ...] | None,
    generate: Callable[[Any, int], tuple[Any, bool]],
    logits: Callable[[Any, Any], Any],
    requested_tokens: int = 0,
) -> None:
    """Load, special tokens, generation and parity checks, appended to `report` (status set last)."""
    from transformers import AutoTokenizer

    problems = {k: v for k, v in report.loading_info.items() if v}
    report.checks.append(
        Check(
            "load",
            "fail" if problems else "pass",
            f"{problems}" if problems else f"loaded in {report.load_seconds:.2f}s",
        )
    )
    tokenizer = None
    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")) or os.path.exists(
        os.path.join(model_dir, "tokenizer.json")
    ):
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    else:
        report.checks.append(Check("tokenizer", "warn", "no tokenizer files: generation checked on token ids only"))

    report.checks.append(_special_tokens_check(model, tokenizer))
    for p in prompts:
        n = requested_tokens if requested_tokens and p.expect is not None else max_new_tokens
        report.generations.append(_generate(model, tokenizer, p, n, generate))
        if requested_tokens > n:
            report.generations[-1].requested_tokens = requested_tokens
    for g in report.generations:
        status = "pass" if g.passed else "fail"
        short = f" (of {g.requested_tokens}: streamed, each token reads every layer)" if g.requested_tokens else ""
        report.checks.append(
            Check(f"generate {g.prompt!r}", status, f"{g.new_tokens} tokens{short}, {g.tokens_per_second}/s")
        )
    if report.generations:
        report.costs["generation_seconds"] = round(sum(g.seconds for g in report.generations), 3)
        report.costs["generation_tokens_per_second"] = round(
            sum(g.new_tokens for g in report.generations) / max(report.costs["generation_seconds"], 1e-9), 2
        )

    if parity and native is not None:
        report.parity = _parity(model, native, model_dir, positions, report.dtype, logits)
        p = report.parity
        if p is None:
            report.checks.append(Check("parity", "warn", "the adapter has no reference forward: parity skipped"))
        else:
            t = p.thresholds
            detail = (
                f"{p.positions} positions (up to {p.max_position}): max |dlogit| {p.max_abs_diff:.3g} "
                f"(bound {t['max_abs_diff']:.3g}, {p.margin:.2g}x), KL {p.kl_divergence:.3g} "
                f"(bound {t['kl_divergence']:.3g}), top-1 {p.top1_agreement:.4f}"
                + (f" ({p.near_ties} near-ties)" if p.near_ties else "")
                + ("" if p.passed else f"; first divergent position {p.first_divergent_position}")
            )
            report.checks.append(Check("parity", "pass" if p.passed else "fail", detail))
            report.costs["parity_seconds"] = p.seconds
            report.costs["parity_reference_seconds"] = p.reference_seconds
            report.costs["parity_tokens_per_second"] = p.tokens_per_second
    elif parity:
        report.checks.append(Check("parity", "warn", "native checkpoint not given: parity skipped"))
    report.status = "fail" if any(c.status == "fail" for c in report.checks) else "pass"


def _eos_ids(gen: Any) -> set[int]:
    eos = gen.eos_token_id
    return set() if eos is None else {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


def _special_tokens_check(model: Any, tokenizer: Any) -> Check:
    """bos/eos must agree between config, generation config and tokenizer (EOS mismatch = endless output)."""
    gen = model.generation_config
    sources = {
        "config.json": (model.config.bos_token_id, model.config.eos_token_id),
        "generation_config.json": (gen.bos_token_id, gen.eos_token_id),
    }
    if tokenizer is not None:
        sources["tokenizer"] = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    problems = []
    for i, name in enumerate(("bos_token_id", "eos_token_id")):
        seen = {src: ids[i] for src, ids in sources.items() if ids[i] is not None}
        if len({json.dumps(v) for v in seen.values()}) > 1:
            problems.append(f"{name} differs: " + ", ".join(f"{k}={v}" for k, v in seen.items()))
    if problems:
        return Check("special tokens", "fail", "; ".join(problems))
    if gen.eos_token_id is None:
        return Check("special tokens", "warn", "no eos_token_id: generation only stops at max_new_tokens")
    return Check("special tokens", "pass", f"bos {gen.bos_token_id}, eos {gen.eos_token_id}")


def _generate(
    model: Any, tokenizer: Any, p: Prompt, max_new_tokens: int, generate: Callable[[Any, int], tuple[Any, bool]]
) -> Generation:
    import torch

    if tokenizer is not None:
        ids = tokenizer(p.prompt, return_tensors="pt").input_ids
    else:
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else 0
        ids = torch.tensor([[bos]])
    start = time.perf_counter()
    new, finite = generate(ids, max_new_tokens)
    seconds = time.perf_counter() - start
    if tokenizer is not None:
        text = tokenizer.decode(new, skip_special_tokens=True)
    else:
        text = " ".join(map(str, new.tolist()))
    passed = finite and len(new) > 0 and text.strip() != ""
    if p.expect is not None and not re.search(p.expect, text):
        passed = False
    if not finite:
        text = f"[non-finite logits] {text}"
    return Generation(
        p.prompt, text, len(new), round(len(new) / max(seconds, 1e-9), 1), p.expect, bool(passed), round(seconds, 3)
    )


def _parity(
    model: Any,
    native: tuple[str, ...],
    model_dir: str,
    positions: int,
    dtype: str,
    logits: Callable[[Any, Any], Any],
) -> Parity | None:
    import torch

    from hubconv.convert import load_adapter

    with open(os.path.join(model_dir, "hubconv.json")) as f:
        native_args = json.load(f)["native_args"]
    adapter, _ = load_adapter(native[0], native[2] if len(native) > 2 else None)
    tokens = _parity_tokens(model.config.vocab_size, positions)
    pos = parity_positions(positions, int(model.config.max_position_embeddings))
    if not getattr(adapter, "reference_takes_positions", True):  # e.g. a user's forward(idx) without position ids
        if positions > int(model.config.max_position_embeddings):
            raise HubconvError(
                f"smoke: the reference forward takes no positions, so parity runs on 0..{positions - 1}, beyond the "
                f"model's {model.config.max_position_embeddings} positions: pass --positions (>= 64) that fits"
            )
        pos = torch.arange(positions)
    start = time.perf_counter()
    with adapter.open(native[1]) as ckpt:
        ref = adapter.reference_logits(ckpt, native_args, tokens, pos)
    if ref is None:
        return None
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    got = logits(tokens, pos)
    seconds = time.perf_counter() - start
    result = compare_logits(ref, got, dtype, int(model.config.num_hidden_layers), int(pos[-1]))
    result.seconds = round(seconds, 3)
    result.reference_seconds = round(reference_seconds, 3)
    result.tokens_per_second = round(positions / max(seconds, 1e-9), 1)
    return result


def write_report(model_dir: str, report: SmokeReport) -> tuple[str, str]:
    """smoke.json (evidence published with the model) and smoke.md (for people)."""
    json_path, md_path = os.path.join(model_dir, "smoke.json"), os.path.join(model_dir, "smoke.md")
    with open(json_path, "w") as f:
        json.dump(report.to_json(), f, indent=2)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(render_markdown(report))
    return json_path, md_path


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")


def render_markdown(report: SmokeReport) -> str:
    icon = {"pass": "✅", "warn": "⚠️", "fail": "❌"}
    lines = [
        f"### Smoke test: {icon[report.status]} {report.status}",
        "",
        f"Device `{report.device}`, dtype `{report.dtype}`, load {report.load_seconds:.2f}s; "
        f"verified by {report.mode_detail or MODES_TEXT.get(report.mode, report.mode)}.",
        "",
        "| check | status | detail |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {_cell(c.name)} | {icon[c.status]} | {_cell(c.detail)} |" for c in report.checks]
    for g in report.generations:
        fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", g.output)), default=0))
        lines += ["", f"Prompt: `{_cell(g.prompt)}`", "", f"{fence}text", g.output, fence]
    return "\n".join(lines) + "\n"
