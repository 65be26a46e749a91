#!/usr/bin/env python3
"""Point action.yml at a prebuilt image by digest, for a release commit.

    scripts/pin-action-image.py ghcr.io/OWNER/hubconv@sha256:<64 hex digits> [--action action.yml]

On main, action.yml says `runs.image: Dockerfile` (GitHub builds the image on every run; `uses: ./` self-tests build
from source). The release workflow runs this script on the tagged commit, so the released action.yml says
`runs.image: docker://ghcr.io/OWNER/hubconv@sha256:...`: users pull the attested, immutable image instead of building
one. Only that one line changes; a tag instead of a digest, an upper-case name or an action.yml that is not a Docker
action building `Dockerfile` is refused (exit 1, one line on stderr). Standard library only (runs on a bare runner).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# registry host (with a dot or a port) / lower-case path components @ sha256 digest (OCI distribution spec grammar)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REF = re.compile(
    rf"^(?:docker://)?(?P<name>(?:[a-z0-9-]+\.)+[a-z0-9-]+(?::[0-9]+)?(?:/{_COMPONENT})+)@sha256:(?P<digest>[0-9a-f]{{64}})$"
)
TOP_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_-]+):")
RUNS_KEY = re.compile(r"^(?P<indent>[ ]+)(?P<key>[A-Za-z0-9_-]+):[ ]*(?P<value>.*?)[ ]*$")


class PinError(Exception):
    """A refusal, reported as one line."""


def image_reference(value: str) -> str:
    """The `docker://NAME@sha256:DIGEST` form of an image reference, or PinError if it is not pinned by digest."""
    match = IMAGE_REF.match(value.strip())
    if not match:
        raise PinError(
            f"image {value!r} is not REGISTRY/NAME@sha256:<64 hex digits> in lower case "
            "(a tag can be moved; only a digest pins the image)"
        )
    return f"docker://{match['name']}@sha256:{match['digest']}"


def pin(text: str, image: str, *, replace: bool = False, name: str = "action.yml") -> str:
    """action.yml `text` with `runs.image` set to `image`; every other byte unchanged (`name` for messages)."""
    ref = image_reference(image)
    lines = text.splitlines(keepends=True)
    runs = [i for i, line in enumerate(lines) if (m := TOP_KEY.match(line)) and m["key"] == "runs"]
    if len(runs) != 1:
        raise PinError(f"{name} has {len(runs)} top-level `runs:` keys, expected one")
    keys: dict[str, tuple[int, re.Match[str]]] = {}
    indent = None  # of runs' own keys (deeper lines belong to their values)
    for i in range(runs[0] + 1, len(lines)):
        line = lines[i].rstrip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            break  # the next top-level key
        match = RUNS_KEY.match(line)
        if match is None:
            continue
        indent = indent if indent is not None else match["indent"]
        if match["indent"] == indent:
            keys[match["key"]] = (i, match)
    using = keys.get("using")
    if using is None or using[1]["value"].strip("'\"") != "docker":
        raise PinError(f"{name}: runs.using is not docker")
    if "image" not in keys:
        raise PinError(f"{name}: runs.image is missing")
    index, match = keys["image"]
    current = match["value"].strip("'\"")
    if current != "Dockerfile" and not (replace and IMAGE_REF.match(current)):
        raise PinError(f"{name}: runs.image is {current!r}, expected Dockerfile (the development action.yml)")
    ending = lines[index][len(lines[index].rstrip("\r\n")) :]
    lines[index] = f"{match['indent']}image: {ref}{ending}"
    return "".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="ghcr.io/OWNER/NAME@sha256:DIGEST (docker:// prefix optional)")
    parser.add_argument("--action", default="action.yml", type=Path, help="the action.yml to rewrite in place")
    parser.add_argument("--replace", action="store_true", help="also replace an image that is already a digest")
    args = parser.parse_args(argv)
    try:
        text = args.action.read_text(encoding="utf-8")
        pinned = pin(text, args.image, replace=args.replace, name=str(args.action))
    except (OSError, PinError) as exc:
        print(f"pin-action-image: error: {exc}", file=sys.stderr)
        return 1
    args.action.write_text(pinned, encoding="utf-8")
    print(f"{args.action}: runs.image: {image_reference(args.image)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
