"""`hubconv release`: convert -> tokenizer -> smoke -> card, into one folder, atomically.

The release folder is assembled in a temporary sibling folder and renamed into place only when
every stage passed, so a failed smoke test leaves nothing half-written (its report is printed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from hubconv import __version__
from hubconv.atomic import prepare_output, publish_dir, staging_dir
from hubconv.config import ReleaseConfig
from hubconv.convert import ConvertResult, convert, input_paths
from hubconv.errors import HubconvError, OutputError
from hubconv.io.writer import ShardSink, parse_size


@dataclass
class StageCheck:
    stage: str
    name: str
    status: str  # pass | warn | fail
    detail: str


@dataclass
class ReleaseResult:
    output: str
    conversion: ConvertResult
    files: dict[str, int]
    checks: list[StageCheck] = field(default_factory=list)
    smoke_status: str = "skipped"
    report_md: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)


class ReleaseFailed(HubconvError):
    """A stage failed; `report` is the markdown report of what was checked."""

    def __init__(self, message: str, report: str):
        super().__init__(message)
        self.report = report


def _git(args: list[str], cwd: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def _strip_credentials(url: str) -> str:
    """https://user:token@host/org/repo.git -> https://host/org/repo.git (never publish a token)."""
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return url


def git_provenance(directory: str, tag: str | None = None) -> dict[str, str | None]:
    """Repository, commit and tag: from GitHub Actions' environment when set, else from git."""
    env = os.environ
    if env.get("GITHUB_REPOSITORY"):
        server = env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/")
        ref_tag = env.get("GITHUB_REF_NAME") if env.get("GITHUB_REF_TYPE") == "tag" else None
        return {
            "git_repository": f"{server}/{env['GITHUB_REPOSITORY']}",
            "git_commit": env.get("GITHUB_SHA"),
            "release_tag": tag or ref_tag,
        }
    remote = _git(["config", "--get", "remote.origin.url"], directory)
    if remote and not re.match(r"^(https?|ssh|git)://|^[\w.-]+@[\w.-]+:", remote):
        remote = None  # a local path (a clone of a clone) would leak the machine's directories
    return {
        "git_repository": _strip_credentials(remote) if remote else None,
        "git_commit": _git(["rev-parse", "HEAD"], directory),
        "release_tag": tag or _git(["describe", "--exact-match", "--tags", "HEAD"], directory),
    }


def _summary(result: ReleaseResult) -> str:
    icon = {"pass": "✅", "warn": "⚠️", "fail": "❌"}
    lines = ["| stage | check | status | detail |", "| --- | --- | --- | --- |"]
    for c in result.checks:
        detail = c.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {c.stage} | {c.name} | {icon.get(c.status, c.status)} | {detail} |")
    return "\n".join(lines) + "\n"


def run_release(
    cfg: ReleaseConfig,
    *,
    overwrite: bool = False,
    progress: bool = True,
    tag: str | None = None,
    sink: ShardSink | None = None,
    smoke_load: str = "auto",
) -> ReleaseResult:
    """Build the complete release folder at `cfg.output` (dry run: nothing leaves the machine).

    With `sink` (a streaming uploader) shards leave as soon as they are written and never all
    exist locally: the smoke test then runs the model layer by layer on the conversion plan's views,
    each tensor checked against the sha256 of the bytes written into the uploaded shard
    (hubconv.streamed_forward). `smoke_load`: auto, full or stream (`run_smoke`'s `load`)."""
    from hubconv.card import Provenance, write_card
    from hubconv.smoke import render_markdown, run_smoke, write_report
    from hubconv.streamed_forward import DigestingSink, plan_weights

    cfg.require("adapter", "checkpoint")
    assert cfg.adapter is not None and cfg.checkpoint is not None
    inputs = input_paths(cfg.checkpoint, cfg.tokenizer.path, cfg.model_args, cfg.mapping)
    inputs.update({"config file": cfg.source, "card template": cfg.card.template})
    inputs.update({f"card section {k}": v for k, v in cfg.card.extra_sections.items() if v.endswith(".md")})
    prepare_output(cfg.output, overwrite, inputs)
    parse_size(cfg.max_shard_size, option="max_shard_size")
    staging: str | None = None
    checks: list[StageCheck] = []
    started = time.time()
    digests = DigestingSink(sink) if sink is not None else None
    try:
        staging = staging_dir(cfg.output, "release")
        shutil.rmtree(staging, ignore_errors=True)
        conversion = convert(
            cfg.adapter,
            cfg.checkpoint,
            staging,
            model_args=cfg.model_args,
            dtype=cfg.dtype,
            max_shard_size=cfg.max_shard_size,
            progress=progress,
            sink=digests,
            mapping=cfg.mapping,
            auto_tokenizer=False,  # written below, with the tokenizer settings of the config
            shown=lambda path: _shown(path, cfg),  # hubconv.json is published with the model
        )
        checks.append(
            StageCheck(
                "convert",
                "tensors",
                "pass",
                f"{len(conversion.dropped)} source entries dropped "
                f"with reasons; {sum(conversion.files.values()):,} bytes written",
            )
        )
        with open(os.path.join(staging, "config.json")) as f:
            vocab_rows = json.load(f).get("vocab_size")

        tokenizer_source = cfg.tokenizer.path or conversion.found_tokenizer
        if tokenizer_source:
            from hubconv.tokenizers import reconcile_special_tokens, write_tokenizer

            if not cfg.tokenizer.path:
                checks.append(
                    StageCheck(
                        "tokenizer", "source", "pass", f"{os.path.basename(tokenizer_source)} found with the checkpoint"
                    )
                )
            tok = write_tokenizer(
                tokenizer_source,
                staging,
                kind=cfg.tokenizer.kind,
                bos_token=cfg.tokenizer.bos_token,
                eos_token=cfg.tokenizer.eos_token,
                special_tokens=cfg.tokenizer.special_tokens or None,
                pat_str=cfg.tokenizer.pat_str,
                chat_template=cfg.tokenizer.chat_template,
                model_max_length=conversion.config.get("max_position_embeddings"),
            )
            tok_checks = list(tok.checks) + list(reconcile_special_tokens(staging, tok, vocab_rows))
            checks += [StageCheck("tokenizer", c.name, c.status, c.detail) for c in tok_checks]
        else:
            checks.append(StageCheck("tokenizer", "tokenizer", "warn", "no tokenizer configured: none published"))

        native: tuple[str, ...] = (f"{conversion.adapter}:{conversion.family}", cfg.checkpoint)
        if cfg.mapping:
            native += (cfg.mapping,)
        smoke_started = time.perf_counter()
        smoke = run_smoke(
            staging,
            prompts=cfg.smoke.prompts,
            max_new_tokens=cfg.smoke.max_new_tokens,
            parity=cfg.smoke.parity,
            positions=cfg.smoke.positions,
            native=native,
            device=cfg.smoke.device,
            dtype=cfg.smoke.dtype,
            load=smoke_load,
            weights=None
            if digests is None
            else plan_weights(cfg.adapter, cfg.checkpoint, cfg.model_args, cfg.mapping, digests.tensors),
        )
        smoke.costs["smoke_seconds"] = round(time.perf_counter() - smoke_started, 3)
        smoke.costs["convert_seconds"] = round(conversion.seconds, 3)
        write_report(staging, smoke)
        checks += [StageCheck("smoke", c.name, c.status, c.detail) for c in smoke.checks]
        result = ReleaseResult(cfg.output, conversion, {}, checks, smoke.status, render_markdown(smoke))
        failed = [c for c in checks if c.status == "fail"]
        if failed:
            raise ReleaseFailed(
                f"release failed at {failed[0].stage}: {failed[0].name}: {failed[0].detail}; nothing was written",
                _summary(result) + "\n" + result.report_md,
            )

        prov = git_provenance(os.path.dirname(os.path.abspath(cfg.source or cfg.checkpoint)), tag)
        provenance = Provenance(
            source_framework=conversion.adapter,
            adapter=f"{conversion.adapter}:{conversion.family}",
            checkpoint=_shown(cfg.checkpoint, cfg),
            hubconv_version=__version__,
            converted_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            **prov,
        )
        fields = card_fields(cfg)
        if fields.title is None and fields.repo_id is None:  # the folder being built is a temporary sibling
            fields.title = os.path.basename(os.path.abspath(cfg.output))
        write_card(staging, fields, provenance)
        checks.append(StageCheck("card", "README.md", "pass", "metadata validated locally"))
        publish_dir(staging, cfg.output)
    except OSError as e:
        raise OutputError(f"{e.filename or cfg.output}: {e.strerror or e}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    result.files = {
        n: os.path.getsize(os.path.join(cfg.output, n)) for n in sorted(os.listdir(cfg.output)) if not n.startswith(".")
    }
    result.provenance = {k: v for k, v in vars(provenance).items() if v is not None}
    return result


def card_fields(cfg: ReleaseConfig) -> Any:
    """The model card fields of a release: the `card:` section plus the Hub repo id."""
    from dataclasses import asdict

    from hubconv.card import CardFields

    return CardFields(repo_id=cfg.hub.repo_id, **asdict(cfg.card))


def _shown(path: str, cfg: ReleaseConfig) -> str:
    """A local path as it may be published: as given when relative, else relative to the config's folder."""
    return _relative(path, cfg) if os.path.isabs(path) else path


def _relative(path: str, cfg: ReleaseConfig) -> str:
    """A checkpoint path relative to the config's folder when inside it (cards must not leak local paths)."""
    base = os.path.dirname(os.path.abspath(cfg.source)) if cfg.source else os.getcwd()
    rel = os.path.relpath(path, base)
    return rel if not rel.startswith("..") else os.path.basename(path.rstrip("/"))


def summary_text(result: ReleaseResult) -> str:
    lines = [f"release folder {result.output} ({result.conversion.adapter}:{result.conversion.family})", ""]
    lines.append(_summary(result))
    for name, size in result.files.items():
        lines.append(f"  {name:40s} {size:>15,d} bytes")
    return "\n".join(lines) + "\n"
