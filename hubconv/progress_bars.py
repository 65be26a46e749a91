"""Library progress bars only on a terminal: in CI logs every carriage-return redraw is a fragment."""

from __future__ import annotations

import sys
from typing import TextIO


def quiet_library_progress_bars(stream: TextIO | None = None) -> bool:
    """Turn off transformers' bars ("Loading weights") and huggingface_hub's (downloads) unless
    `stream` (default: stderr, where tqdm writes) is a terminal; True when they were turned off.

    hubconv's own progress stays: line-based when not on a terminal (see sources.py)."""
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        pass
    from transformers.utils import logging

    logging.disable_progress_bar()  # transformers' switch; it also calls huggingface_hub's disable_progress_bars()
    return True
