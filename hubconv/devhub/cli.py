"""`hubconv devhub`: run the dev Hub in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--port", type=int, default=8765, help="port to listen on (0: any free port; default 8765)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--data", required=True, help="directory holding the repos (created if missing)")
    p.add_argument("--token", default=None, help="write token (default: $DEVHUB_TOKEN or a generated one)")
    p.add_argument("--read-token", default=None, help="read-only token (default: $DEVHUB_READ_TOKEN or generated)")
    p.add_argument("--user", default="devuser", help="user name the tokens belong to (default devuser)")
    p.add_argument(
        "--org", action="append", default=None, help="organization the user belongs to (repeatable; default devorg)"
    )
    return p


def build_parser(prog: str = "hubconv devhub") -> argparse.ArgumentParser:
    return add_arguments(
        argparse.ArgumentParser(
            prog=prog,
            description="Run a local Hugging Face Hub (uploads, LFS, PRs, downloads) for tests and dry runs.",
        )
    )


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `devhub` subcommand on hubconv's CLI (sets `func=run_from_args`)."""
    p = sub.add_parser(
        "devhub",
        help="run a local dev Hugging Face Hub",
        description="Run a local Hugging Face Hub (uploads, LFS, PRs, downloads) for tests and dry runs.",
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    return p


def main(
    port: int = 8765,
    data: str | os.PathLike[str] = "devhub-data",
    token: str | None = None,
    read_token: str | None = None,
    *,
    host: str = "127.0.0.1",
    user: str = "devuser",
    orgs: Sequence[str] | None = None,
) -> int:
    """Start the dev Hub, print its URL and tokens, serve until Ctrl-C. Returns an exit code."""
    from .server import DevHub

    hub = DevHub(
        data,
        host=host,
        port=port,
        token=token or os.environ.get("DEVHUB_TOKEN") or None,
        read_token=read_token or os.environ.get("DEVHUB_READ_TOKEN") or None,
        user=user,
        orgs=tuple(orgs) if orgs else ("devorg",),
    )
    try:
        hub._bind()
    except OSError as e:
        print(f"hubconv devhub: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    # The tokens are printed once, here, for the operator; they never appear in the server log.
    print(f"devhub: serving {hub.url}  (data: {hub.storage.root})", flush=True)
    print(f"devhub: user {hub.user}, orgs {', '.join(orgs or ('devorg',))}", flush=True)
    print(f"devhub: write token: {hub.token}", flush=True)
    print(f"devhub: read token:  {hub.read_token}", flush=True)
    print(f"devhub: export HF_ENDPOINT={hub.url} HF_TOKEN=<write token> HF_HUB_DISABLE_XET=1", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        print("devhub: stopped", file=sys.stderr)
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    return main(
        port=args.port,
        data=args.data,
        token=args.token,
        read_token=args.read_token,
        host=args.host,
        user=args.user,
        orgs=args.org,
    )


def serve(argv: Sequence[str] | None = None) -> int:
    """Entry point for `hubconv devhub ARGS...`: parse `argv` (without the subcommand) and serve."""
    return run_from_args(build_parser().parse_args(argv))
