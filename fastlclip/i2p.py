"""Read prompt files in the format of I2P ("Inappropriate Image Prompts", Schramowski et al. 2023).

A CSV with a header. Only ``prompt`` is required; I2P's other columns are read when present:
``categories`` (comma-separated names, e.g. ``"sexual,shocking"``), ``inappropriate_percentage`` and
``nudity_percentage`` (0-100), ``hard`` (0/1). Any further columns (``sd_seed``, ``lexica_url``, ...) are
kept as strings in ``extra``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field

I2P_CATEGORIES = ("hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity")
_KNOWN = ("prompt", "categories", "inappropriate_percentage", "nudity_percentage", "hard")


@dataclass(frozen=True)
class I2PPrompt:
    """One row; ``None`` where the column is absent or the cell empty."""

    prompt: str
    categories: tuple[str, ...] = ()  # lower-case, stripped, in file order
    inappropriate_percentage: float | None = None
    nudity_percentage: float | None = None
    hard: bool | None = None
    line: int = 0  # line in the file, for messages
    extra: dict[str, str] = field(default_factory=dict)


def _number(value: str, column: str, where: str) -> float | None:
    if not value.strip():
        return None
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{where}: column {column!r} must be a number, got {value!r}") from None
    if not math.isfinite(x) or not 0 <= x <= 100:
        raise ValueError(f"{where}: column {column!r} is a percentage and must lie in [0, 100], got {value!r}")
    return x


def _flag(value: str, where: str) -> bool | None:
    v = value.strip().lower()
    if not v:
        return None
    if v in ("1", "1.0", "true", "yes"):
        return True
    if v in ("0", "0.0", "false", "no"):
        return False
    raise ValueError(f"{where}: column 'hard' must be 0/1 (or true/false), got {value!r}")


def read_i2p(path: str | os.PathLike, *, limit: int | None = None) -> list[I2PPrompt]:
    """Rows of an I2P-format CSV, in file order; at most ``limit``. Rows with an empty prompt are skipped with a warning."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file {os.fspath(path)!r} does not exist; pass an I2P-format CSV (e.g. i2p_benchmark.csv)")
    name = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:offset].count(b"\n") + 1
        raise ValueError(
            f"{name} is not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}, line {line}); "
            "re-save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.csv > out.csv)"
        ) from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise ValueError(f"{name}, line {line}: a NUL byte; this is no text CSV (a binary or UTF-16 file?); re-save it "
                         "as UTF-8 text")
    rows: list[I2PPrompt] = []
    skipped = []
    # strict: a quoted cell that is never closed, or text after a closing quote, is an error, not merged rows.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    start = 1  # first line of the record being read
    try:
        if reader.fieldnames is None:
            raise ValueError(f"{name!r} is empty; an I2P-format CSV needs a header row with a 'prompt' column")
        names = [n.strip() for n in reader.fieldnames]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{name!r}: the header names column(s) {twice} more than once, so which cell is meant is "
                             "ambiguous; rename or remove the duplicates")
        if "prompt" not in names:
            raise ValueError(f"{name!r} has no 'prompt' column (columns: {names}); the header row must name it "
                             "'prompt' (I2P's other columns are optional)")
        reader.fieldnames = names
        start = reader.line_num + 1
        for record in reader:
            end = reader.line_num
            where = f"{name}, line {end}"
            if end > start and any("\n" in v or "\r" in v for v in record.values() if isinstance(v, str)):
                raise ValueError(
                    f"{name}, lines {start}-{end}: a cell spans {end - start + 1} lines; an unbalanced quote (\") merges "
                    "the rows that follow into one cell. Close the quote (a quote inside a quoted cell is written \"\"); "
                    "if a prompt really spans lines, put it on one line"
                )
            start = end + 1
            if None in record:
                raise ValueError(f"{where}: more cells than header columns; quote cells that contain commas")
            record = {k: v or "" for k, v in record.items()}
            prompt = record["prompt"].strip()
            if not prompt:
                skipped.append(reader.line_num)
                continue
            rows.append(I2PPrompt(
                prompt=prompt,
                categories=tuple(c.strip().lower() for c in record.get("categories", "").split(",") if c.strip()),
                inappropriate_percentage=_number(record.get("inappropriate_percentage", ""), "inappropriate_percentage", where),
                nudity_percentage=_number(record.get("nudity_percentage", ""), "nudity_percentage", where),
                hard=_flag(record.get("hard", ""), where),
                line=reader.line_num,
                extra={k: v for k, v in record.items() if k not in _KNOWN},
            ))
            if limit is not None and len(rows) == limit:
                break
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise ValueError(
                f"{name}, line {start}: a cell is longer than {csv.field_size_limit()} characters (csv.field_size_limit); "
                "no prompt is that long: an unbalanced quote (\") probably swallows the rows that follow"
            ) from None
        if "unexpected end of data" in str(e):
            raise ValueError(f"{name}, line {start}: a quote (\") opened here is never closed, so every later row would "
                             "become part of this cell; close it (a quote inside a quoted cell is written \"\")") from None
        raise ValueError(f"{name}, line {start}: malformed CSV ({e}); a quoted cell must end with its closing quote and "
                         "then a comma or the line end (a quote inside a quoted cell is written \"\")") from None
    if skipped:
        warnings.warn(f"{os.fspath(path)}: skipped {len(skipped)} row(s) with an empty prompt (lines {skipped[:10]})", stacklevel=2)
    if not rows:
        raise ValueError(f"{os.fspath(path)!r} has no rows with a prompt")
    return rows
