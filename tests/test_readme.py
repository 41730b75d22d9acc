"""The README's runnable quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"(?<!-->\n)```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no runnable python block"
    for code in blocks:
        exec(compile(code, str(README), "exec"), {})
    assert "cosine" in capsys.readouterr().out
