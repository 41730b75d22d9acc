"""Every code block and command in README.md and docs/*.md is checked, so a doc that drifts from the code fails.

Pages are found by glob: a new page is checked as soon as it exists. What each kind of block gets:

- ```python: run, in order, in one namespace per page (a page reads as one session), from the repository
  root, with random weights. A line ``print(EXPR)  # LITERAL`` also asserts ``EXPR == LITERAL``.
- ```python after ``<!-- doc: no-run; given: a, b -->``: for code that needs what a test cannot have
  (published weights, an SDXL pipeline, a GPU). Compiled, never run; every name it reads must be
  assigned in it, listed after ``given:``, imported, or left by the page's earlier runnable blocks; every
  attribute of ``fastlclip`` (and of the page's objects, and of the instances a fastlclip class or
  annotated function returns) must exist, and every call to them must bind to the callee's signature.
- ```bash, and inline ``python -m ...`` / ``pip install ...`` spans in the prose: each command is checked
  without doing its work. ``python -m MOD ARGS`` runs MOD as ``__main__`` until its argument parser has
  parsed ARGS, then stops (a renamed module, flag or choice fails); ``python -m pytest PATHS``: the paths
  exist; ``make T``: the Makefile has target T; ``pip install``: the extras exist in pyproject.toml;
  ``bash SCRIPT [PART]``: the script parses (``bash -n``) and takes PART as a case. Any other command fails
  until a check for it is added here.
- Inline ``fastlclip.load("NAME", "hf-hub:REPO")`` spans: REPO is published (``checkpoint.PUBLISHED``)
  with config NAME; ``huggingface-cli download REPO FILE``: FILE is the one PUBLISHED names.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import copy
import functools
import importlib
import inspect
import re
import runpy
import shlex
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest

import fastlclip
from fastlclip import checkpoint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!--\s*doc:\s*(?P<marker>[^>]*?)\s*-->\s*\n)?^```(?P<lang>\w*)\n(?P<code>.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def blocks(page: Path) -> list[tuple[str, str, int, str]]:
    """(lang, marker, first line, code) of each fenced block."""
    text = page.read_text()
    return [(m["lang"], m["marker"] or "", text.count("\n", 0, m.start("code")) + 1, m["code"])
            for m in BLOCK.finditer(text)]


def prose(page: Path) -> str:
    """The page without its fenced blocks."""
    return BLOCK.sub("", page.read_text())


# ---------------------------------------------------------------- python blocks

_PRINT_EXPECT = re.compile(r"^(?P<indent>\s*)print\((?P<expr>.*)\)\s*#\s*(?P<lit>[\[({'\"\d].*)$")


def _with_output_checks(code: str) -> str:
    """``print(EXPR)  # LITERAL`` also asserts EXPR == LITERAL, when the comment is a Python literal."""
    out = []
    for line in code.splitlines():
        m = _PRINT_EXPECT.match(line)
        try:
            literal = m and ast.literal_eval(m["lit"].strip())
        except (ValueError, SyntaxError):
            literal = None
        if m and literal is not None:
            line = (f"{m['indent']}__v = ({m['expr']}); print(__v); "
                    f"assert __v == {literal!r}, ('the page says', {literal!r}, 'the code gives', __v)")
        out.append(line)
    return "\n".join(out) + "\n"


class _Instance:
    """A value known only by its class (what a call to a fastlclip class or annotated function returns)."""

    def __init__(self, cls: type):
        self.cls = cls


_UNKNOWN = object()


def _set_in_source(cls: type, attr: str) -> bool:
    """Whether a class (or a base) assigns ``self.<attr>`` or declares ``<attr>:`` in its source."""
    pattern = re.compile(rf"(self\.{attr}\s*(:[^=\n]*)?=[^=])|(^\s+{attr}\s*:)", re.M)
    for klass in cls.__mro__:
        with contextlib.suppress(TypeError, OSError):
            if pattern.search(inspect.getsource(klass)):
                return True
    return False


def _returns(func) -> object:
    """What a call gives, as far as its annotation says."""
    if inspect.isclass(func):
        return _Instance(func)
    try:
        ann = inspect.signature(func).return_annotation
    except (TypeError, ValueError):
        return _UNKNOWN
    if isinstance(ann, str):
        try:
            ann = eval(ann, getattr(inspect.unwrap(getattr(func, "func", func)), "__globals__", {}))  # the callee's own annotation
        except Exception:
            return _UNKNOWN
    return _Instance(ann) if inspect.isclass(ann) else _UNKNOWN


class _Checker(ast.NodeVisitor):
    """Static checks of a no-run block against the live objects (see the module docstring)."""

    def __init__(self, env: dict, given: set[str], where: str):
        self.env, self.given, self.where, self.errors = dict(env), given, where, []

    def fail(self, node, msg):
        self.errors.append(f"{self.where}+{node.lineno - 1}: {msg}")

    def value(self, node) -> object:
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):  # for-loop and with targets
            self.env[node.id] = _UNKNOWN
            return _UNKNOWN
        if isinstance(node, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
            inner = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
            inner |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            outer, self.given = self.given, self.given | inner
            for child in ast.iter_child_nodes(node):
                self.value(child)
            self.given = outer
            return _UNKNOWN
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            if node.id in self.given or hasattr(builtins, node.id):
                return _UNKNOWN
            self.fail(node, f"{node.id!r} is read but never defined; assign it, or list it after 'given:'")
            return _UNKNOWN
        if isinstance(node, ast.Attribute):
            base = self.value(node.value)
            if base is _UNKNOWN:
                return _UNKNOWN
            if isinstance(base, _Instance):
                if hasattr(base.cls, node.attr):
                    member = inspect.getattr_static(base.cls, node.attr)
                    if isinstance(member, (staticmethod, classmethod)):
                        return getattr(base.cls, node.attr)
                    return functools.partial(member, None) if inspect.isfunction(member) else _UNKNOWN  # bound
                if not _set_in_source(base.cls, node.attr):
                    self.fail(node, f"{base.cls.__name__} has no attribute {node.attr!r}")
                return _UNKNOWN
            if not hasattr(base, node.attr):
                self.fail(node, f"{getattr(base, '__name__', type(base).__name__)} has no attribute {node.attr!r}")
                return _UNKNOWN
            return getattr(base, node.attr)
        if isinstance(node, ast.Call):
            func = self.value(node.func)
            args = [self.value(a) for a in node.args]
            for k in node.keywords:
                self.value(k.value)
            if func is _UNKNOWN or not callable(func) or isinstance(func, _Instance):
                return _UNKNOWN
            if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
                return _returns(func)
            try:
                sig = inspect.signature(func)
            except (TypeError, ValueError):
                return _returns(func)
            try:
                sig.bind(*args, **{k.arg: None for k in node.keywords})
            except TypeError as e:
                self.fail(node, f"{getattr(func, '__qualname__', func)}{sig}: {e}")
            return _returns(func)
        for child in ast.iter_child_nodes(node):
            self.value(child)
        return _UNKNOWN

    def bind(self, target, value):
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self.bind(t, _UNKNOWN)
        else:
            self.value(target)

    def run(self, tree: ast.Module):
        for stmt in tree.body:
            if isinstance(stmt, ast.Import):
                for a in stmt.names:
                    __import__(a.name)
                    self.env[(a.asname or a.name).split(".")[0]] = sys.modules[a.name.split(".")[0]] \
                        if not a.asname else sys.modules[a.name]
            elif isinstance(stmt, ast.ImportFrom):
                module = __import__(stmt.module, fromlist=["*"])
                for a in stmt.names:
                    if not hasattr(module, a.name):
                        with contextlib.suppress(ImportError):
                            __import__(f"{stmt.module}.{a.name}")
                    if not hasattr(module, a.name):
                        self.fail(stmt, f"{stmt.module} has no {a.name!r}")
                        continue
                    self.env[a.asname or a.name] = getattr(module, a.name)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                value = self.value(stmt.value) if stmt.value is not None else _UNKNOWN
                for t in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]):
                    self.bind(t, value)
            else:
                self.value(stmt)


def check_no_run(code: str, marker: str, env: dict, where: str) -> list[str]:
    given = set()
    m = re.search(r"given:\s*(.*)$", marker)
    if m:
        given = {g.strip() for g in m[1].split(",") if g.strip()}
    checker = _Checker(env, given, where)
    checker.run(ast.parse(code, where))
    return checker.errors


# ---------------------------------------------------------------- commands

class _Parsed(Exception):
    pass


@contextlib.contextmanager
def _stop_after_parsing():
    """ArgumentParser.parse_args / parse_known_args raise _Parsed when the outermost call has parsed."""
    originals = {name: getattr(argparse.ArgumentParser, name) for name in ("parse_args", "parse_known_args")}
    depth = [0]

    def wrap(original):
        def parse(self, *args, **kwargs):
            depth[0] += 1
            try:
                result = original(self, *args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                raise _Parsed(result)
            return result
        return parse

    for name, original in originals.items():
        setattr(argparse.ArgumentParser, name, wrap(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(argparse.ArgumentParser, name, original)


def check_python_m(module: str, args: list[str], capsys) -> str | None:
    if module == "pytest":
        missing = [a for a in args if not a.startswith("-") and not (ROOT / a.split("::")[0]).exists()]
        return f"pytest paths that do not exist: {missing}" if missing else None
    argv = sys.argv
    placeholders = tempfile.TemporaryDirectory()
    sys.argv = [module, *(_placeholder(a, Path(placeholders.name)) for a in args)]
    try:
        with _stop_after_parsing():
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except _Parsed:
        return None
    except SystemExit as e:
        return f"exit {e.code}: {capsys.readouterr().err.strip()[-500:]}"
    except ImportError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        sys.argv = argv
        placeholders.cleanup()
    return "it ran to the end without parsing arguments with argparse; add a check for it to tests/test_docs.py"


def _placeholder(arg: str, folder: Path) -> str:
    """A user's file that a documented command names (``A.parquet``, ``epoch_34.pt``) as an empty file of that
    name, so an argument type that checks the file exists parses; what is in it is the command's own later check."""
    if re.fullmatch(r"[\w.-]+\.(parquet|pt|safetensors|csv|tar|json|txt)", arg) and not (ROOT / arg).exists():
        (folder / arg).touch()
        return str(folder / arg)
    return arg


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_command(words: list[str], capsys) -> str | None:
    """None when the command is right, else why not."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]  # environment assignments
    if not words:
        return "empty command"
    prog, args = words[0], words[1:]
    if re.fullmatch(r"(\S*/)?python3?", prog) and args[:1] == ["-m"] and len(args) > 1:
        if args[1] == "pip":
            return check_command(["pip", *args[2:]], capsys)
        return check_python_m(args[1], args[2:], capsys)
    if prog == "make":
        targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))
        missing = [a for a in args if a not in targets]
        return f"Makefile has no target {missing}" if missing else None
    if prog == "pip" and args[:1] == ["install"]:
        wanted = {e.strip() for a in args for group in re.findall(r"^(?:\.|fastlclip)\[([^\]]+)\]", a)
                  for e in group.split(",")}
        unknown = wanted - _extras()
        return f"pyproject.toml has no extra {sorted(unknown)}" if unknown else None
    if prog == "bash" and args:
        script = ROOT / args[0]
        if not script.is_file():
            return f"no script {args[0]}"
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        if r.returncode:
            return f"bash -n {args[0]}: {r.stderr.strip()}"
        if len(args) > 1 and not re.search(rf"(^|[\s|(]){re.escape(args[1])}([|)])", script.read_text(), re.M):
            return f"{args[0]} has no part {args[1]!r}"
        return None
    return f"no check for {prog!r} commands in tests/test_docs.py"


def bash_commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def inline_commands(page: Path) -> list[str]:
    return [s for s in INLINE.findall(prose(page)) if re.match(r"(\S+=\S+ )*(python3? -m |pip install |make |bash )", s)]


# ---------------------------------------------------------------- tests

@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-weights warning, Triton fallbacks on CPU
        yield


_MODELS: dict = {}


@pytest.fixture
def cached_load(monkeypatch):
    """``fastlclip.load(name)`` without a checkpoint builds each random-weight model once per test session
    and hands out copies: the pages' examples cost one model build per distinct call, not one per page."""
    real = fastlclip.load

    def load(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs)
        call.apply_defaults()
        if call.arguments["pretrained"] is not None or not isinstance(call.arguments["name"], str):
            return real(*args, **kwargs)
        key = repr(sorted(call.arguments.items()))
        if key not in _MODELS:
            _MODELS[key] = real(*args, **kwargs)
        return copy.deepcopy(_MODELS[key])

    monkeypatch.setattr(fastlclip, "load", load)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_python_blocks(page, monkeypatch, cached_load):
    monkeypatch.chdir(ROOT)
    env: dict = {"__name__": "__doc__"}
    errors = []
    for lang, marker, line, code in blocks(page):
        where = f"{_id(page)}:{line}"
        if lang != "python":
            continue
        if marker.startswith("no-run"):
            errors += check_no_run(code, marker, env, where)
            continue
        assert not marker, f"{where}: unknown block marker {marker!r} (known: 'no-run; given: ...')"
        exec(compile(_with_output_checks(code), where, "exec"), env)
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_commands(page, capsys):
    commands = [c for lang, _, _, code in blocks(page) if lang in ("bash", "sh", "shell") for c in bash_commands(code)]
    commands += inline_commands(page)
    errors = []
    for command in commands:
        why = check_command(shlex.split(command, comments=True), capsys)
        if why:
            errors.append(f"{command}\n    -> {why}")
    assert not errors, f"{_id(page)}:\n" + "\n".join(errors)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_weights_and_links(page):
    text = page.read_text()
    for name, repo in re.findall(r'fastlclip\.load\("([^"]+)",\s*"hf-hub:([\w.-]+/[\w.-]+)"', text):
        assert repo in checkpoint.PUBLISHED, f"{_id(page)}: {repo} is not in checkpoint.PUBLISHED"
        assert checkpoint.PUBLISHED[repo][0] == name, f"{_id(page)}: {repo} holds {checkpoint.PUBLISHED[repo][0]}"
    for repo, file in re.findall(r"huggingface-cli download ([\w.-]+/[\w.-]+) (\S+?)`", text):
        assert checkpoint.PUBLISHED.get(repo, (None, None))[1] == file, f"{_id(page)}: {repo} {file}"
    for target in re.findall(r"\]\(((?!https?:)[^)#\s]+)", text):
        assert (page.parent / target).exists(), f"{_id(page)}: broken link {target}"


def test_readme_lists_every_published_checkpoint_and_page():
    text = (ROOT / "README.md").read_text()
    for repo, (name, _) in checkpoint.PUBLISHED.items():
        assert f'fastlclip.load("{name}", "hf-hub:{repo}")' in text, f"README's weights table lacks {repo}"
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in text, f"README's documentation table lacks docs/{page.name}"


def test_the_checker_catches_drift(capsys):
    """The checks fail on what a drifted doc would say."""
    assert check_command(shlex.split("python -m fastlclip.corpus score s.tar --out o --model M --safety "
                                     "[--engine ray --workers 8]"), capsys)
    assert check_command(shlex.split("python -m fastlclip.corpus score s.tar --out o --model M --no-such-flag"), capsys)
    assert check_command(shlex.split("python -m fastlclip.no_such_module"), capsys)
    assert check_command(shlex.split("make no-such-target"), capsys)
    assert check_command(shlex.split("pip install -e '.[no-such-extra]'"), capsys)
    assert check_command(shlex.split("bash bench/gpu_suite.sh no-such-part"), capsys)
    assert check_command(shlex.split("python -m fastlclip.corpus select d --by c --threshold 0 --out k"), capsys) is None
    assert check_no_run("import fastlclip\nfastlclip.laod('x')\n", "no-run", {}, "t")
    assert check_no_run("import fastlclip\nm = fastlclip.load('x', nope=1)\n", "no-run", {}, "t")
    assert check_no_run("import fastlclip\nm = fastlclip.load('x')\nm.encode_latent(z)\n", "no-run; given: z", {}, "t")
    assert check_no_run("import fastlclip\nfastlclip.LatentCLIPReward(m)\n", "no-run", {}, "t")  # m undefined
    assert not check_no_run("import fastlclip\nm = fastlclip.load('x')\nm.encode_latents(z, space='vae')\nm.cfg\n",
                            "no-run; given: z", {}, "t")
    assert not check_no_run("import fastlclip\nm = fastlclip.load('x')\n"
                            "fastlclip.ZeroShotClassifier(m, ['a', 'b'], [lambda c: f'{c}.'])\n"
                            "for name in [n for n in fastlclip.list_models()]:\n    print(name)\n", "no-run", {}, "t")
    with pytest.raises(AssertionError, match="the page says"):
        exec(compile(_with_output_checks("print(1 + 1)  # 3"), "t", "exec"), {})


# -- the command-line reference (docs/cli.md) ---------------------------------------------------------------------
CLI_MODULES = (
    "fastlclip.corpus.__main__", "fastlclip.distill.__main__", "fastlclip.serve.__main__", "fastlclip.convert")
CLI_PAGE = ROOT / "docs" / "cli.md"
CLI_INTRO = """# Command-line reference

Every argument of the fastlclip commands: what it takes, its default, what it is. This page is written from the
commands' argument parsers (python tests/test_docs.py > docs/cli.md) and tests/test_docs.py fails when the two
differ. Each command checks every argument before any work starts: a bad one is one line on stderr and exit
status 2, never a traceback.
"""


def _takes(a: argparse.Action) -> str:
    if a.choices:
        return ", ".join(f"`{c}`" for c in a.choices)
    if a.nargs == 0:
        return "a flag"
    named = {int: "an integer", float: "a number", Path: "a file path"}
    takes = getattr(a.type, "what", None) or named.get(a.type) or f"`{a.metavar or a.dest.upper()}`"
    return takes + (", one or more" if a.nargs == "+" else "")


def _cli_table(p: argparse.ArgumentParser) -> list[str]:
    either = {id(a): g for g in p._mutually_exclusive_groups if g.required for a in g._group_actions}
    rows = ["| argument | takes | default | what it is |", "|---|---|---|---|"]
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = ", ".join(f"`{o}`" for o in a.option_strings) or f"`{a.metavar or a.dest}`"
        if id(a) in either:
            flags = " / ".join(f"`{x.option_strings[0]}`" for x in either[id(a)]._group_actions)
            default = f"one of {flags} required"
        elif a.required:
            default = "required"
        elif a.nargs == 0:
            default = "off"
        else:
            default = "none" if a.default is None else f"`{a.default}`"
        help_text = (a.help or "").replace("|", "\\|")
        rows.append(f"| {name} | {_takes(a)} | {default} | {help_text} |")
    return rows


def cli_reference() -> str:
    """docs/cli.md as the parsers of CLI_MODULES make it."""
    out = [CLI_INTRO]
    for module in CLI_MODULES:
        p = importlib.import_module(module).parser()
        sub = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        out += [f"## {p.prog}", "", p.description.strip(), ""]
        if sub is None:
            out += [*_cli_table(p), ""]
        else:
            for c in sub._choices_actions:
                out += [f"### {p.prog} {c.dest}", "", c.help, "", *_cli_table(sub.choices[c.dest]), ""]
    return "\n".join(out)


def test_the_command_line_reference_is_what_the_parsers_say():
    assert CLI_PAGE.read_text() == cli_reference(), (
        "docs/cli.md differs from the commands' parsers: rewrite it with python tests/test_docs.py > docs/cli.md")


if __name__ == "__main__":
    print(cli_reference(), end="")
