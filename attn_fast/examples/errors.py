"""The one exception type for mistakes in what a user gave the examples and the CLI: a file, a flag, an input.

`attn-fast` prints such an error as one line on stderr (`attn-fast <command>: error: <message>`) and exits with a
non-zero status, without a traceback (`--debug` or ATTN_FAST_DEBUG=1 shows it). Anything else that escapes is a bug
and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, worded for them: name the file or flag and say what was expected."""
