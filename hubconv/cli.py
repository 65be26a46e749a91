"""The `hubconv` command line."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hubconv import __version__
from hubconv.errors import HubconvError


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a native checkpoint into a transformers model folder",
        description="Convert a native training checkpoint into a Hugging Face transformers folder "
        "(sharded safetensors, config.json, generation_config.json), streaming tensor by tensor.",
    )
    p.add_argument(
        "--adapter",
        required=True,
        help="source framework (`hubconv adapters`): torchtitan, nanogpt, mapping, optionally NAME:FAMILY; or a "
        "plugin PATH.py:CLASS or PACKAGE.MODULE:CLASS (this imports and runs that code)",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint folder or file (TorchTitan: the DCP step-N folder; nanoGPT: ckpt.pt or its out_dir)",
    )
    p.add_argument("--output", required=True, help="output folder (written to a temporary folder, then renamed)")
    p.add_argument(
        "--model-args",
        help="native hyperparameters: JSON/YAML file, TorchTitan job TOML, or a named flavor such as 8B",
    )
    p.add_argument(
        "--tokenizer", help="also write HF tokenizer files from an HF folder, tiktoken BPE, SentencePiece or meta.pkl"
    )
    p.add_argument("--mapping", metavar="FILE.yml", help="YAML mapping for --adapter mapping (your own model code)")
    p.add_argument("--dtype", default="auto", help="auto (keep source dtype), bfloat16, float16 or float32")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="always ask transformers for the target architecture (ignore the cache in ~/.cache/hubconv)",
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from hubconv.convert import convert

    r = convert(
        args.adapter,
        args.checkpoint,
        args.output,
        model_args=args.model_args,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        overwrite=args.overwrite,
        progress=not (args.quiet or args.json),
        use_cache=not args.no_cache,
        tokenizer=args.tokenizer,
        mapping=args.mapping,
    )
    if args.json:
        json.dump(
            {
                "output": r.output,
                "adapter": r.adapter,
                "family": r.family,
                "files": r.files,
                "dropped": r.dropped,
                "config": r.config,
                "seconds": round(r.seconds, 3),
            },
            sys.stdout,
            indent=2,
        )
        print()
        return 0
    total = sum(r.files.values())
    print(f"converted {args.checkpoint} with {r.adapter}:{r.family} -> {r.output} in {r.seconds:.1f}s")
    for name, size in r.files.items():
        print(f"  {name:40s} {size:>15,d} bytes")
    print(f"  {'total':40s} {total:>15,d} bytes")
    if r.dropped:
        print("dropped source entries:")
        for reason, n in Counter(r.dropped.values()).most_common():
            print(f"  {n:5d} x {reason}")
    for note in r.notes:
        print(f"note: {note}")
    return 0


def _add_smoke(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "smoke",
        help="load, generate and check logits parity of a converted folder",
        description="Load a converted folder with transformers (offline), generate greedily from prompts, and "
        "compare logits with the native checkpoint when given. Writes smoke.json and smoke.md into the folder; "
        "exits non-zero when a check fails.",
    )
    p.add_argument("model_dir", metavar="DIR", help="converted model folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt to generate from (repeatable)")
    p.add_argument("--expect", action="append", default=[], help="regex the Nth prompt's output must match")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--adapter", help="adapter of the native checkpoint (default: from DIR/hubconv.json)")
    p.add_argument("--checkpoint", help="native checkpoint for the parity check (default: from DIR/hubconv.json)")
    p.add_argument("--mapping", help="mapping file of --adapter mapping (default: from DIR/hubconv.json)")
    p.add_argument("--no-parity", action="store_true", help="skip the logits parity check")
    p.add_argument("--positions", type=int, default=96, help="positions compared by the parity check (>= 64)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (float32 when it fits), bfloat16, float16, float32")
    p.add_argument(
        "--load",
        choices=("auto", "full", "stream"),
        default="auto",
        help="full: from_pretrained; stream: one layer in memory at a time; auto: full for small models (default)",
    )
    p.add_argument("--json", action="store_true", help="print smoke.json to stdout")
    p.set_defaults(func=_cmd_smoke)


def _cmd_smoke(args: argparse.Namespace) -> int:
    import os

    from hubconv.config import Prompt
    from hubconv.smoke import render_markdown, run_smoke, write_report

    if len(args.expect) > len(args.prompt):
        raise HubconvError("--expect given more often than --prompt")
    _check_expect(args.expect)
    prompts = [Prompt(p, args.expect[i] if i < len(args.expect) else None) for i, p in enumerate(args.prompt)]
    native = None
    record_path = os.path.join(args.model_dir, "hubconv.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        adapter = args.adapter or record.get("adapter_spec") or f"{record['adapter']}:{record['family']}"
        checkpoint = args.checkpoint or record.get("checkpoint")
        mapping = args.mapping or (record.get("mapping") or {}).get("path")
        if checkpoint and os.path.exists(checkpoint):
            native = (adapter, checkpoint, mapping) if mapping else (adapter, checkpoint)
    report = run_smoke(
        args.model_dir,
        prompts=prompts or [Prompt("The")],
        max_new_tokens=args.max_new_tokens,
        parity=not args.no_parity,
        positions=args.positions,
        native=native,
        device=args.device,
        dtype=args.dtype,
        load=args.load,
    )
    write_report(args.model_dir, report)
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        print()
    else:
        print(render_markdown(report), end="")
    return 0 if report.status == "pass" else 1


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented starter .hubconv.yml", description="Write a starter config.")
    p.add_argument("--config", default=".hubconv.yml", help="where to write it (default .hubconv.yml)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_cmd_init)


def _cmd_init(args: argparse.Namespace) -> int:
    import os

    from hubconv.config import STARTER

    if os.path.exists(args.config) and not args.force:
        raise HubconvError(f"{args.config}: already exists (pass --force to replace it)")
    with open(args.config, "w") as f:
        f.write(STARTER)
    print(f"wrote {args.config}: edit it, then run `hubconv release --dry-run`")
    return 0


def _add_push_args(p: argparse.ArgumentParser, *, with_repo: bool = True) -> None:
    if with_repo:
        p.add_argument("--repo-id", required=True, help="Hub repository, e.g. org/model")
        p.add_argument("--revision", default="main", help="branch to commit to (default main)")
        p.add_argument("--private", action="store_true", help="create the repository as private")
        p.add_argument("--create-pr", action="store_true", help="open (or update) a Hub pull request")
        p.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--commit-message")
    p.add_argument("--force", action="store_true", help="move an existing Hub tag that points at other content")


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="publish a release folder to the Hub in one atomic commit",
        description="Upload every file of DIR in one commit (idempotent: unchanged files are not sent, an unchanged "
        "folder makes no commit), tag it, or open/update a Hub PR with a report comment. Token: HF_TOKEN.",
    )
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--tag", help="Hub tag to create on the commit (e.g. the git release tag)")
    _add_push_args(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_push)


def _print_push(result: Any, as_json: bool) -> None:
    if as_json:
        json.dump(result.to_json(), sys.stdout, indent=2)
        print()
        return
    what = "unchanged: no new commit" if result.no_op else f"commit {result.commit_sha[:12]}"
    print(f"pushed to {result.repo_url} ({what})")
    print(f"  commit: {result.commit_url}")
    if result.tag:
        print(f"  tag:    {result.tag}")
    if result.pr_url:
        print(f"  PR:     {result.pr_url}")


def _cmd_push(args: argparse.Namespace) -> int:
    from hubconv.hub import push

    result = push(
        args.model_dir,
        args.repo_id,
        revision=args.revision,
        tag=args.tag,
        create_pr=args.create_pr,
        private=args.private,
        commit_message=args.commit_message,
        endpoint=args.endpoint,
        force=args.force,
    )
    _print_push(result, args.json)
    return 0


def _add_release(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "release",
        help="convert, add the tokenizer, smoke-test and write the model card (then publish)",
        description="Build a complete, verified release folder from .hubconv.yml and/or flags: convert -> tokenizer "
        "-> smoke test (generation + parity) -> model card. Fails, leaving nothing behind, when a check fails.",
    )
    p.add_argument("--config", help="config file (default: .hubconv.yml when present)")
    p.add_argument("--dry-run", action="store_true", help="build and check the release folder; publish nothing")
    p.add_argument("--output", help="release folder (config: output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing release folder")
    p.add_argument("--tag", help="release tag recorded in the card (default: from git / GitHub)")
    g = p.add_argument_group("conversion (override the config)")
    g.add_argument("--adapter")
    g.add_argument("--checkpoint")
    g.add_argument("--model-args")
    g.add_argument("--mapping", help="YAML mapping file for --adapter mapping")
    g.add_argument("--dtype")
    g.add_argument("--max-shard-size")
    g.add_argument("--tokenizer", help="HF tokenizer folder, tiktoken BPE file, SentencePiece .model or meta.pkl")
    g.add_argument("--tokenizer-kind", help="hf, tiktoken, sentencepiece or char (default: detected)")
    g.add_argument("--bos-token")
    g.add_argument("--eos-token")
    s = p.add_argument_group("smoke test")
    s.add_argument("--prompt", action="append", help="prompt (repeatable; replaces the config's prompts)")
    s.add_argument("--expect", action="append", help="regex for the Nth --prompt")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--no-parity", action="store_true")
    s.add_argument("--positions", type=int)
    s.add_argument("--device")
    s.add_argument("--load", choices=("auto", "full", "stream"), default="auto", help="as in `hubconv smoke --load`")
    h = p.add_argument_group("hub and card")
    h.add_argument("--repo-id")
    h.add_argument("--private", action="store_true", default=None)
    h.add_argument("--create-pr", action="store_true", default=None)
    h.add_argument("--revision")
    h.add_argument("--endpoint")
    h.add_argument("--license")
    h.add_argument("--title")
    h.add_argument("--description")
    h.add_argument("--language", action="append")
    h.add_argument("--base-model")
    _add_push_args(h, with_repo=False)
    p.add_argument(
        "--stream-upload",
        action="store_true",
        help="upload each shard as soon as it is written and delete it locally (disk: about two shards); the smoke "
        "test then runs the model layer by layer on the uploaded bytes (read through the conversion, sha256-checked)",
    )
    p.add_argument(
        "--local-hub",
        metavar="DATA_DIR",
        help="publish to a loopback Hub server (hubconv devhub) storing its data in DATA_DIR, then download the "
        "commit back and check it generates like the local folder: the whole flow offline, no account needed",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_release)


def _check_expect(patterns: list[str]) -> None:
    from hubconv.config import regex_problem

    for pattern in patterns:
        problem = regex_problem(pattern)
        if problem:
            raise HubconvError(f"--expect: {problem}")


def release_config(args: argparse.Namespace) -> Any:
    """The config file (if any) with every given flag applied on top."""
    import os

    from hubconv.config import CONFIG_NAME, Prompt, ReleaseConfig, load_config

    path = args.config or (CONFIG_NAME if os.path.exists(CONFIG_NAME) else None)
    cfg = load_config(path) if path else ReleaseConfig()
    top = {
        "adapter": "adapter",
        "checkpoint": "checkpoint",
        "model_args": "model_args",
        "mapping": "mapping",
        "dtype": "dtype",
        "max_shard_size": "max_shard_size",
        "output": "output",
    }
    for flag, attr in top.items():
        if getattr(args, flag) is not None:
            setattr(cfg, attr, getattr(args, flag))
    if args.max_shard_size is not None:
        from hubconv.io.writer import parse_size

        parse_size(args.max_shard_size)
    for flag, attr in {
        "tokenizer": "path",
        "tokenizer_kind": "kind",
        "bos_token": "bos_token",
        "eos_token": "eos_token",
    }.items():
        if getattr(args, flag) is not None:
            setattr(cfg.tokenizer, attr, getattr(args, flag))
    if args.prompt:
        expects = args.expect or []
        if len(expects) > len(args.prompt):
            raise HubconvError("--expect given more often than --prompt")
        _check_expect(expects)
        cfg.smoke.prompts = [Prompt(p, expects[i] if i < len(expects) else None) for i, p in enumerate(args.prompt)]
    for flag in ("max_new_tokens", "positions", "device"):
        if getattr(args, flag) is not None:
            setattr(cfg.smoke, flag, getattr(args, flag))
    if args.no_parity:
        cfg.smoke.parity = False
    for flag in ("repo_id", "private", "create_pr", "revision", "endpoint"):
        if getattr(args, flag) is not None:
            setattr(cfg.hub, flag, getattr(args, flag))
    _apply_card_flags(args, cfg)
    return cfg


def _apply_card_flags(args: argparse.Namespace, cfg: Any) -> None:
    if args.repo_id is not None:
        cfg.hub.repo_id = args.repo_id
    for flag in ("license", "title", "description", "language", "base_model"):
        if getattr(args, flag) is not None:
            setattr(cfg.card, flag, getattr(args, flag))


def _cmd_release(args: argparse.Namespace) -> int:
    import contextlib
    import os

    from hubconv.hub import StreamingUploader
    from hubconv.release import ReleaseFailed, run_release, summary_text

    cfg = release_config(args)
    if not args.dry_run:  # a typo in the Hub inputs fails now, not after the conversion
        from hubconv.hub import CONFIG_FIELDS, HubFields, preflight

        cfg.require_hub()
        fields = HubFields(
            repo_id="--repo-id" if args.repo_id else CONFIG_FIELDS.repo_id,
            endpoint="--endpoint" if args.endpoint else CONFIG_FIELDS.endpoint,
        )
        local = bool(args.local_hub)
        preflight(cfg.hub.repo_id, endpoint=None if local else cfg.hub.endpoint, fields=fields, need_token=not local)
    hub_ctx: Any = contextlib.nullcontext(None)
    if args.local_hub and not args.dry_run:
        from hubconv.devhub import DevHub

        namespace = (cfg.hub.repo_id or "devuser/model").split("/")[0]
        hub_ctx = DevHub(args.local_hub, orgs=(namespace,))
    with hub_ctx as local:
        endpoint = local.url if local else cfg.hub.endpoint
        token = local.token if local else None
        uploader = None
        if args.stream_upload:
            if args.dry_run:
                raise HubconvError("--stream-upload publishes as it converts: it cannot be combined with --dry-run")
            from hubconv.hub import open_repo

            api = open_repo(cfg.hub.repo_id, endpoint=endpoint, token=token, private=cfg.hub.private)
            uploader = StreamingUploader(api, cfg.hub.repo_id)
        try:
            result = run_release(
                cfg,
                overwrite=args.overwrite,
                progress=not (args.quiet or args.json),
                tag=args.tag,
                sink=uploader,
                smoke_load=args.load,
            )
        except BaseException as e:
            if uploader is not None:
                uploader.abort()  # nothing is committed: pre-uploaded objects stay unreferenced
            if isinstance(e, ReleaseFailed):
                print(e.report, file=sys.stderr)
            raise
        preuploaded = uploader.finish() if uploader is not None else []
        out: dict[str, Any] = {
            "output": result.output,
            "files": result.files,
            "smoke_status": result.smoke_status,
            "checks": [vars(c) for c in result.checks],
            "provenance": result.provenance,
        }
        if not args.json:
            print(summary_text(result), end="")
            print(result.report_md, end="")
        if not args.dry_run:
            from hubconv.hub import push

            pushed = push(
                result.output,
                cfg.hub.repo_id,
                revision=cfg.hub.revision,
                tag=result.provenance.get("release_tag"),
                create_pr=cfg.hub.create_pr,
                private=cfg.hub.private,
                commit_message=args.commit_message,
                endpoint=endpoint,
                token=token,
                force=args.force,
                report_md=result.report_md,
                preuploaded=preuploaded,
            )
            if uploader is not None:
                out["stream"] = {"peak_shard_bytes_on_disk": uploader.peak_bytes_on_disk}
            out["push"] = pushed.to_json()
            if not args.json:
                _print_push(pushed, False)
            if local:
                out["verify"] = _verify_local(local, cfg, result.output, pushed, args.json, streamed=bool(preuploaded))
                if not args.json:
                    print(f"browse it: hubconv devhub --data {os.path.abspath(args.local_hub)}")
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
    return 0


def _verify_local(local: Any, cfg: Any, folder: str, pushed: Any, quiet: bool, streamed: bool) -> dict[str, Any]:
    """Download what was pushed to the loopback Hub and check it generates like the local folder."""
    from hubconv.hub import REPORT_FILES
    from hubconv.verify import verify_download

    revision = f"refs/pr/{pushed.pr_number}" if pushed.pr_number else pushed.commit_sha
    ignore = REPORT_FILES if pushed.no_op else frozenset()  # a no-op run keeps the published reports
    check = verify_download(
        cfg.hub.repo_id,
        revision,
        local.url,
        local.token,
        folder,
        cfg.smoke.prompts[0].prompt,
        ignore=ignore,
        compare_generation=not streamed,
    )
    if not (check["files_identical"] and check["same_generation"]):
        raise HubconvError(f"the downloaded release differs from the local folder: {check}")
    if not quiet:
        same = "the same" if check["generation_compared"] else "(streamed: no local copy to compare)"
        print(
            f"verified: downloaded {revision} from {local.url} with huggingface_hub; files identical, transformers "
            f"loads it and generates {same} {len(check['generated_ids'])} tokens"
        )
    return check


def _add_card(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "card",
        help="write the model card (README.md) of a release folder",
        description="Render README.md for a converted folder from its config.json, hubconv.json, smoke.json and "
        "weight files, with card fields from .hubconv.yml and/or flags.",
    )
    p.add_argument("model_dir", metavar="DIR")
    p.add_argument("--config", help="config file for the card fields (default: .hubconv.yml when present)")
    p.add_argument("--repo-id")
    p.add_argument("--license")
    p.add_argument("--title")
    p.add_argument("--description")
    p.add_argument("--language", action="append")
    p.add_argument("--base-model")
    p.add_argument("--tag", help="release tag")
    p.set_defaults(func=_cmd_card)


def _cmd_card(args: argparse.Namespace) -> int:
    import os

    from hubconv.card import Provenance, write_card
    from hubconv.config import CONFIG_NAME, ReleaseConfig, load_config
    from hubconv.release import card_fields, git_provenance

    path = args.config or (CONFIG_NAME if os.path.exists(CONFIG_NAME) else None)
    cfg = load_config(path) if path else ReleaseConfig()
    _apply_card_flags(args, cfg)
    prov = Provenance(**git_provenance(os.path.abspath(args.model_dir), args.tag))
    print(f"wrote {write_card(args.model_dir, card_fields(cfg), prov)}")
    return 0


def _add_action(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "action",
        help="run as the GitHub Action (reads GITHUB_* and INPUT_* from the environment)",
        description="The GitHub Action entry point: maps the triggering event (release, tag push, workflow_dispatch, "
        "pull_request, /hubconv comments) to a release run, writes step outputs, a job summary and annotations.",
    )
    p.set_defaults(func=lambda args: __import__("hubconv.action", fromlist=["run_action"]).run_action())


def _add_adapters(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "adapters",
        help="list adapters (built-in and installed plugins), ops and checkpoint readers",
        description="List built-in adapters and installed plugins (entry points in the group hubconv.adapters, "
        "imported to describe them) with where each comes from; a plugin that fails to load is listed with its "
        "error. Plugins are also named directly: --adapter path/to/file.py:ClassName or "
        "--adapter package.module:ClassName (importing a plugin executes its code).",
    )
    p.add_argument("--ops", action="store_true", help="also list the ops mapping rules can use")
    p.add_argument("--readers", action="store_true", help="also list the checkpoint readers, in the order tried")
    p.set_defaults(func=_cmd_adapters)


def _cmd_adapters(args: argparse.Namespace) -> int:
    from hubconv.adapters.registry import listing

    for row in listing():
        if row.adapter is None:
            print(f"{row.name:12s} (plugin failed to load) {row.error}")
            continue
        print(f"{row.name:12s} {row.adapter.description} [families: {', '.join(row.adapter.families)}]")
        print(f"{'':12s}   from {row.origin}")
    if args.ops:
        from hubconv import ops

        print("\nops:")
        for name, doc in ops.describe():
            print(f"  {name:18s} {doc}")
    if args.readers:
        from hubconv.io.checkpoint import readers

        print("\ncheckpoint readers (chosen by content, in this order):")
        for r in readers():
            print(f"  {r.name:18s} {r.kind:6s} {r.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hubconv",
        description="Publish native LLM training checkpoints to the Hugging Face Hub as verified transformers models.",
    )
    parser.add_argument("--version", action="version", version=f"hubconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_smoke(sub)
    _add_card(sub)
    _add_push(sub)
    _add_release(sub)
    _add_init(sub)
    _add_action(sub)
    _add_adapters(sub)
    from hubconv.devhub.cli import add_parser as _add_devhub

    _add_devhub(sub)
    from hubconv.import_cli import add_parser as _add_import

    _add_import(sub)
    from hubconv.publish_cli import add_parser as _add_publish

    _add_publish(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so every `finally` removes its staging folder."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors are one `hubconv: error:` line and exit 1 (SIGINT 130, SIGTERM 143).
    HUBCONV_DEBUG=1 adds the traceback."""
    args = build_parser().parse_args(argv)
    from hubconv.memory import pin_mmap_threshold

    pin_mmap_threshold()  # block buffers go back to the OS: flat memory however many tensors stream through
    debug = os.environ.get("HUBCONV_DEBUG", "") not in ("", "0")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        return int(args.func(args) or 0)
    except HubconvError as e:
        if debug:
            traceback.print_exc()
        print(f"hubconv: error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hubconv: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("hubconv: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # a bug or an unforeseen input: still one line, the traceback on request
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (set HUBCONV_DEBUG=1 to see the traceback)"
        print(f"hubconv: error: {type(e).__name__}: {_one_line(str(e))}{hint}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
