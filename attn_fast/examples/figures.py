"""Figure files of both examples (alignment heatmaps, attention overlays): the formats they can be saved in, the
output path checked and its directory made before any work, atomic saving, and text matplotlib can draw as given.

    path = prepare_figure_path("runs/plots/alignment.png", "--heatmap")   # UserError now, not after decoding
    ...
    save_figure(figure, path, dpi=120)                                     # all or nothing at `path`
"""
from __future__ import annotations

import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from attn_fast.examples.errors import UserError

__all__ = ["FIGURE_FORMATS", "figure_format", "prepare_figure_path", "save_figure", "plain_text",
           "missing_glyphs_ignored"]

#: File extensions a figure can be saved as (matplotlib's Agg, SVG and PDF backends, always installed with it).
FIGURE_FORMATS = ("png", "svg", "pdf")
_SURROGATE = re.compile("[\ud800-\udfff]")


def figure_format(path: str | os.PathLike, flag: str = "the figure path") -> str:
    """The format of `path` from its extension ("png", "svg" or "pdf", any case); UserError naming `flag`
    otherwise (matplotlib would only refuse it after the work that made the figure)."""
    extension = Path(path).suffix.lower().lstrip(".")
    if extension not in FIGURE_FORMATS:
        raise UserError(f"{flag} {os.fspath(path)!r}: the file name must end in "
                        f"{', '.join('.' + f for f in FIGURE_FORMATS)} (the figure's format)")
    return extension


def prepare_figure_path(path: str | os.PathLike, flag: str) -> Path:
    """Check `path` (the value of `flag`) before any decoding: a supported extension, not a directory, and its
    directory made when missing (as `--write-samples` makes its own). UserError naming `flag` when it cannot be."""
    figure_format(path, flag)
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r} is a directory; give a file name such as "
                        f"{os.fspath(path / 'figure.png')!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file where a directory should be, no permission, ...
        raise UserError(f"{flag} {os.fspath(path)!r}: cannot make its directory {os.fspath(path.parent)!r} "
                        f"({error.strerror or error})") from None
    return path


def save_figure(figure, path: str | os.PathLike, *, dpi: int) -> None:
    """Save the matplotlib `figure` to `path` (format from its extension) through a temporary file in the same
    directory, renamed over `path` once complete: a failure (a full disk, an interrupt) leaves any earlier file at
    `path` as it was, and no partial file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=dpi, format=figure_format(path))
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def plain_text(text: str) -> str:
    """`text` as matplotlib should draw it, literally: "$" escaped (a pair of them would start mathtext, whose
    parser fails on most text) and lone surrogates (bytes of invalid UTF-8 kept by Python, which no font or file
    can hold) replaced by U+FFFD."""
    return _SURROGATE.sub("\ufffd", text).replace("$", r"\$")


@contextmanager
def missing_glyphs_ignored():
    """Within: no "Glyph ... missing from font(s)" warnings (a character the font lacks is drawn as a box, which
    is all a warning could say; users of other scripts would get one per character on stderr)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from", category=UserWarning)
        yield
