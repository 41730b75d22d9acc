"""The wheel installs only ``fastlclip``: ``kernels`` and ``bench`` are other packages' names on PyPI. The
top-level ``kernels/`` folder is ``fastlclip.kernels``, in the wheel and in the editable install, and nothing in
the checkout shadows an installed distribution when Python runs from the repository root."""

import ast
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import fastlclip.kernels.flash_attention

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_fastlclip(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fastlclip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fastlclip", wheel.name.split("-py")[0] + ".dist-info"}
    assert not any(n.startswith(("kernels/", "bench/", "tests/")) for n in names)
    for data in ("fastlclip/configs/models/Latent-ViT-B-8-512.json", "fastlclip/configs/diffusers/sdxl_vae.json",
                 "fastlclip/kernels/flash_attention.py", "fastlclip/kernels/fused_patch_embed.py",
                 "fastlclip/runtime/graph.py"):
        assert data in names
    packaged = {n for n in names if n.endswith(".py")}
    for source in [*ROOT.glob("fastlclip/**/*.py"), *ROOT.glob("kernels/*.py")]:
        rel = source.relative_to(ROOT).as_posix()
        assert (rel if rel.startswith("fastlclip/") else "fastlclip/" + rel) in packaged, rel
    # Installed from the wheel, away from the checkout: the kernels import as fastlclip.kernels, and only there.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fastlclip.kernels.launch as k, importlib.util; "
            "print(k.__file__, importlib.util.find_spec('kernels') is None or 'site-packages' in "
            "importlib.util.find_spec('kernels').origin)")
    out = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    path, other = out.stdout.split()
    assert Path(path) == site / "fastlclip" / "kernels" / "launch.py" and other == "True"


def test_fastlclip_kernels_is_the_top_level_folder():
    """A namespace package (no ``__init__.py``, so it never shadows Hugging Face's ``kernels``); in the checkout
    ``fastlclip/kernels`` is a link to it, so the source tree and setuptools' editable install both import it."""
    assert [Path(p).resolve() for p in fastlclip.kernels.__path__] == [ROOT / "kernels"]
    assert Path(fastlclip.kernels.flash_attention.__file__).resolve() == ROOT / "kernels" / "flash_attention.py"
    assert (ROOT / "fastlclip" / "kernels").is_symlink()
    assert (ROOT / "fastlclip" / "kernels").readlink() == Path("../kernels")


# Run from the repository root, as `python -m pytest` and `python -m bench.x` are: sys.path[0] is the root. Prints
# where each import came from, and which names the checkout's regular packages and modules take from the distributions.
_FROM_THE_ROOT = """
import importlib, importlib.metadata, json, pathlib, sys
names = {p.name for p in pathlib.Path('.').iterdir() if (p / '__init__.py').is_file()}
names |= {p.stem for p in pathlib.Path('.').glob('*.py')} | {p.stem for p in pathlib.Path('tests').glob('*.py')}
owners = importlib.metadata.packages_distributions()
taken = sorted(n for n in names if set(owners.get(n, ())) - {'fastlclip'})
import kernels
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPModel
import open_clip
print(json.dumps(dict(path0=sys.path[0], kernels=kernels.__file__, taken=taken, diffusers=AutoencoderKL.__module__,
                      transformers=CLIPModel.__module__)))
"""


def test_no_top_level_folder_shadows_an_installed_distribution():
    """Hugging Face's ``kernels`` (imported by transformers >= 5.25 on every diffusers model import) is the one
    ``import kernels`` finds from the repository root: the checkout's ``kernels/`` is a namespace portion (no
    ``__init__.py``), which any regular package later on sys.path takes precedence over (PEP 420). No other
    top-level name of the checkout (``bench``, the test helpers pytest puts on sys.path) is a distribution's."""
    assert "kernels" in importlib.metadata.packages_distributions(), "the test extra installs Hugging Face's kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", _FROM_THE_ROOT], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["path0"] in ("", str(ROOT))
    assert Path(seen["kernels"]) == Path(importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py"))
    assert seen["taken"] == []
    assert seen["diffusers"].startswith("diffusers.") and seen["transformers"].startswith("transformers.")


def _imports(path: Path) -> set[str]:
    """Absolute names of the fastlclip modules a source file imports at module level (relative resolved)."""
    package = ("fastlclip." + ".".join(path.relative_to(ROOT).with_suffix("").parts[1:])).rsplit(".", 1)[0]
    if path.relative_to(ROOT).parts[0] == "kernels":
        package = "fastlclip.kernels"
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {n for n in out if n.startswith("fastlclip")}


def test_imports_run_one_way():
    """model.py is plain PyTorch; the kernels import nothing from fastlclip; the runtimes never reach up."""
    model = _imports(ROOT / "fastlclip" / "model.py")
    assert not {n for n in model if n.startswith(("fastlclip.kernels", "fastlclip.runtime", "fastlclip.rewards"))}
    for source in ROOT.glob("kernels/*.py"):
        assert all(n.startswith("fastlclip.kernels") for n in _imports(source)), source
    for source in ROOT.glob("fastlclip/runtime/*.py"):
        up = {n for n in _imports(source) if n.startswith(("fastlclip.rewards", "fastlclip.safety", "fastlclip.factory",
                                                           "fastlclip.zeroshot", "fastlclip.reno"))}
        assert not up, (source, up)


def test_no_function_hides_its_module():
    """``from fastlclip.runtime import apply`` is a function; no submodule shares its name."""
    package = ROOT / "fastlclip" / "runtime"
    init = ast.parse((package / "__init__.py").read_text())
    exported = {a.asname or a.name for n in init.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert not exported & {p.stem for p in package.glob("*.py")}
