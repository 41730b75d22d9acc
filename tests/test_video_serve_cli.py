"""``python -m fastlclip.serve --pooling``: a video space's model served with min pooling replies each clip's
worst-frame cosine (the per-frame reference of tests/test_video_serve.py, pooled here by hand); the option on
an image model is a one-line error, exit 2. uvicorn is not started."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import tiny_video as tv
from test_serve import serve_main
from test_video_serve import body, clips, post, reference, replied


def serve(tmp_path, monkeypatch, cfg, model, *args):
    """``fastlclip.serve``'s main on ``cfg`` and ``model``'s weights (files in ``tmp_path``), uvicorn stubbed:
    ``(exit code, the app it built)``."""
    from safetensors.torch import save_file

    path, weights = tmp_path / "model.json", tmp_path / "model.safetensors"
    path.write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return serve_main(monkeypatch, ["--model", str(path), "--pretrained", str(weights), "--device", "cpu", *args])


def test_pooling_min_serves_each_clips_worst_frame(tmp_path, monkeypatch):
    vae = tv.tiny_vae("wan2.1").double()
    model, model64 = tv.model(vae, "wan2.1"), tv.model(vae, "wan2.1").double()
    code, app = serve(tmp_path, monkeypatch, tv.model_config(vae, "wan2.1"), model, "--pooling", "min")
    assert code == 0
    z = clips(vae, frames=3)
    pooled, frames = replied(post(app, body(z)))
    ref = reference("wan2.1", vae, model64, z)
    torch.testing.assert_close(frames, ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(pooled, ref.amin(1), rtol=0, atol=2e-5)
    assert not torch.allclose(pooled, ref.mean(1), atol=1e-3)  # not the mean


def test_pooling_on_an_image_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import tiny_spaces as ts

    vae = ts.tiny_vae("sana")
    with pytest.raises(SystemExit) as e:
        serve(tmp_path, monkeypatch, ts.model_config(vae, "sana"), ts.model(vae, "sana"), "--pooling", "min")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--pooling is for a model on a video space" in err and "'sana'" in err
