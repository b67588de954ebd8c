"""Reading users' text files: UTF-8 or a clear refusal naming the line."""

from __future__ import annotations

from pathlib import Path

from langmerge.errors import InputError


def read_text(path: Path, what: str = "file") -> str:
    """A text file's contents as UTF-8 (a byte-order mark dropped); other encodings, such as
    what spreadsheet programs save by default, are refused with the line to look at."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: the {what} is not UTF-8 text (byte 0x{raw[e.start]:02x}); save it "
            "as UTF-8 (in a spreadsheet program: “CSV UTF-8”; in an editor: encoding UTF-8)"
        ) from None
