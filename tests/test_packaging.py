"""The wheel installs only ``fastlclip``: ``kernels`` and ``bench`` are other packages' names on PyPI. The
top-level ``kernels/`` folder is ``fastlclip.kernels``, in the wheel and in the editable install."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import fastlclip.kernels

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


def test_fastlclip_kernels_is_the_top_level_folder():
    assert Path(fastlclip.kernels.__file__).resolve() == ROOT / "kernels" / "__init__.py"
    assert not (ROOT / "fastlclip" / "kernels").exists()


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
    """``from fastlclip.kernels import attention`` is a function; no submodule shares its name."""
    for package in (ROOT / "kernels", ROOT / "fastlclip" / "runtime"):
        init = ast.parse((package / "__init__.py").read_text())
        exported = {a.asname or a.name for n in init.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not exported & {p.stem for p in package.glob("*.py")}, package
