"""`hubconv publish worker|finalize`: one release split across N workers (see `hubconv.workers`)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# Every attribute `hubconv.cli.release_config` reads; the publish commands set only some of them.
_RELEASE_FLAGS = (
    "config adapter checkpoint model_args mapping dtype max_shard_size output tokenizer tokenizer_kind bos_token "
    "eos_token prompt expect max_new_tokens positions device repo_id private create_pr revision endpoint license "
    "title description language base_model"
).split()


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="release config (default: .hubconv.yml when present); the same for every worker")
    p.add_argument("--manifests", required=True, metavar="DIR", help="folder of the workers' shard manifests")
    g = p.add_argument_group("conversion (override the config; must be the same for every worker and the final step)")
    g.add_argument("--adapter")
    g.add_argument("--checkpoint")
    g.add_argument("--model-args")
    g.add_argument("--mapping", help="YAML mapping file for --adapter mapping")
    g.add_argument("--dtype")
    g.add_argument("--max-shard-size")
    h = p.add_argument_group("hub (token: HF_TOKEN)")
    h.add_argument("--repo-id")
    h.add_argument("--endpoint", help="Hub URL (default: hub.endpoint, HF_ENDPOINT or https://huggingface.co)")
    h.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `publish` on hubconv's command line."""
    p = sub.add_parser(
        "publish",
        help="publish one release from N workers (matrix jobs or processes) and one final commit",
        description="Sharded publishing: `publish worker --worker I/N` converts and pre-uploads worker I's shards of "
        "the deterministic shard plan and writes its manifest; `publish finalize` checks all N manifests and the "
        "Hub's objects, builds and verifies the rest of the release and makes the single atomic commit.",
    )
    steps = p.add_subparsers(dest="step", required=True, metavar="STEP")
    w = steps.add_parser(
        "worker",
        help="convert and pre-upload this worker's shards, then write its manifest",
        description="Convert only this worker's shards (a contiguous run of about 1/N of the plan), pre-upload each "
        "to the Hub as soon as it is written (at most two on disk) and write DIR/hubconv-shards-I-of-N.json. "
        "Running it again uploads nothing the Hub already holds.",
    )
    w.add_argument("--worker", required=True, metavar="I/N", help="this worker's place, e.g. 2/4 (1-based)")
    w.add_argument("--work-dir", help="where shards are written before upload (default: the system temp folder)")
    _common(w)
    w.set_defaults(func=_cmd_worker)
    f = steps.add_parser(
        "finalize",
        help="check the manifests, build and verify the release, make the one commit",
        description="Read every manifest in DIR, refuse a missing, failed, duplicated or foreign worker (another "
        "plan, checkpoint, config or repo) and shards the Hub does not hold; then build the release folder as "
        "`release --stream-upload` does (config, index, tokenizer, hubconv.json, verification, card) and commit "
        "it with the workers' shards in one commit (tag or Hub PR as `hubconv push`).",
    )
    f.add_argument("--output", help="release folder for the small files (config: output)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing release folder")
    f.add_argument("--tag", help="release tag: Hub tag and card (default: from git / GitHub)")
    f.add_argument("--revision", help="branch to commit to (default main)")
    f.add_argument("--create-pr", action="store_true", default=None, help="open (or update) a Hub pull request")
    f.add_argument("--commit-message")
    f.add_argument("--force", action="store_true", help="move an existing Hub tag that points at other content")
    _common(f)
    f.set_defaults(func=_cmd_finalize)
    return p


def _config(args: argparse.Namespace) -> Any:
    from hubconv.cli import release_config

    flags = {name: getattr(args, name, None) for name in _RELEASE_FLAGS}
    return release_config(argparse.Namespace(**flags, no_parity=False))


def _cmd_worker(args: argparse.Namespace) -> int:
    from hubconv.workers import parse_worker, run_worker

    index, count = parse_worker(args.worker)
    cfg = _config(args)
    r = run_worker(
        cfg,
        index,
        count,
        args.manifests,
        endpoint=args.endpoint,
        work_dir=args.work_dir,
        progress=not (args.quiet or args.json),
    )
    if args.json:
        json.dump(vars(r), sys.stdout, indent=2)
        print()
        return 0
    print(
        f"worker {index}/{count}: {len(r.shards)} shard(s), {r.uploaded_bytes:,} bytes on the Hub in {r.seconds:.1f}s"
    )
    for s in r.shards:
        print(f"  {s['file']:40s} {s['size']:>15,d} bytes  sha256 {s['sha256']}")
    print(f"manifest: {r.manifest}")
    return 0


def _cmd_finalize(args: argparse.Namespace) -> int:
    from hubconv.cli import _print_push
    from hubconv.release import ReleaseFailed, summary_text
    from hubconv.workers import finalize

    cfg = _config(args)
    try:
        r = finalize(
            cfg,
            args.manifests,
            endpoint=args.endpoint,
            tag=args.tag,
            overwrite=args.overwrite,
            commit_message=args.commit_message,
            force=args.force,
            progress=not (args.quiet or args.json),
        )
    except ReleaseFailed as e:
        print(e.report, file=sys.stderr)
        raise
    if args.json:
        out = {
            "output": r.release.output,
            "files": r.release.files,
            "smoke_status": r.release.smoke_status,
            "checks": [vars(c) for c in r.release.checks],
            "provenance": r.release.provenance,
            "workers": [{"manifest": m.path, **m.doc["worker"], "shards": len(m.shards)} for m in r.manifests],
            "push": r.push.to_json(),
        }
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    print(
        f"{len(r.manifests)} worker manifest(s) checked: every shard is on the Hub with the digest its worker reported"
    )
    print(summary_text(r.release), end="")
    print(r.release.report_md, end="")
    _print_push(r.push, False)
    return 0
