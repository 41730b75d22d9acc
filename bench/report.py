"""Output for every benchmark: number formatting, one table printer (plain text or Markdown) and JSON files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

NOT_MEASURED = "not measured"


def fmt(value: Any, spec: str = ".2f") -> str:
    """A number formatted with ``spec``; ``-`` for None; any other value (a reason, "not measured") as text."""
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, markdown: bool = False) -> str:
    """Columns aligned to their widest cell: a Markdown pipe table, or plain text with a dashed rule."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    if markdown:
        def line(row):
            return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
        rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    else:
        def line(row):
            return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *map(line, cells)])


def write_json(path: Path, report: dict) -> Path:
    """``report`` as indented JSON at ``path`` (folders made; replaced atomically, so a reader never sees half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
