"""The wheel installs only ``fastlclip``: ``kernels`` and ``bench`` are other packages' names on PyPI."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_only_fastlclip(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("fastlclip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"fastlclip", wheel.name.split("-py")[0] + ".dist-info"}
    for data in ("fastlclip/configs/models/Latent-ViT-B-8-512.json", "fastlclip/configs/diffusers/sdxl_vae.json",
                 "fastlclip/kernels/attention.py"):
        assert data in names
