"""Checkpoint formats, safety against hostile pickles, strict key/shape checks, conversion."""

import os
import pickle
import zipfile

import pytest
import torch

import fastlclip
from fastlclip import CheckpointError
from fastlclip.convert import main as convert_main
from conftest import TINY, official_state

LATENT = TINY["vision_cfg"]["image_size"] // 8


def _same(a, b):
    z = torch.randn(2, 4, LATENT, LATENT)
    return torch.equal(a.encode_latents(z), b.encode_latents(z)) and torch.equal(a.encode_text(["hi"]), b.encode_text(["hi"]))


def test_official_checkpoint_loads_weights_only(official_ckpt, reference):
    model = fastlclip.load(TINY, official_ckpt)
    assert model.visual.vae_encoder is not None
    assert torch.equal(model.visual.latent_vit.conv1.weight, reference.visual.conv1.weight)
    assert torch.equal(model.text_projection, reference.text_projection)


def test_convert_roundtrip_drops_optimizer(official_ckpt, tmp_path, capsys):
    fastlclip.add_model_config("tiny-test", TINY)
    out = tmp_path / "tiny.safetensors"
    assert convert_main([str(official_ckpt), str(out), "--model", "tiny-test"]) == 0
    assert "tiny-test" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata()["fastlclip_config"] == "tiny-test"
        assert not any("optimizer" in k or k.startswith("module.") for k in f.keys())
    a = fastlclip.load("tiny-test", official_ckpt)
    b = fastlclip.load(None, out)  # config name from metadata
    assert b.cfg.name == "tiny-test" and _same(a, b)


def test_convert_infers_config_and_rejects_wrong_one(official_ckpt, tmp_path, capsys):
    fastlclip.add_model_config("tiny-test", TINY)
    assert convert_main([str(official_ckpt), str(tmp_path / "x.safetensors")]) == 0
    assert convert_main([str(official_ckpt), str(tmp_path / "y.safetensors"), "--model", "Latent-ViT-B-8-512"]) == 1
    assert "does not fit" in capsys.readouterr().err


def test_folder_picks_latest_epoch(official_ckpt, tmp_path, reference):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    older = official_state(reference)
    older["state_dict"]["module.logit_scale"] = torch.tensor(0.0)
    torch.save(older, folder / "epoch_9.pt")
    os.link(official_ckpt, folder / "epoch_34.pt")
    m = fastlclip.load(TINY, tmp_path / "run")
    assert torch.equal(m.logit_scale, reference.logit_scale)


def test_hostile_pickle_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.latent_vit.proj": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused.*system.*nothing in it was run"):
        fastlclip.load(TINY, path)
    assert not marker.exists()


def test_raw_pickle_without_zip_refused(tmp_path):
    path = tmp_path / "legacy.bin"
    path.write_bytes(pickle.dumps({"state_dict": {"a": eval}}))  # references builtins.eval
    with pytest.raises(CheckpointError, match="refused|not a readable"):
        fastlclip.load(TINY, path)


def test_missing_and_unexpected_keys_listed(official_ckpt, reference, tmp_path):
    ck = official_state(reference)
    del ck["state_dict"]["module.ln_final.weight"]
    ck["state_dict"]["module.visual.latent_vit.extra_token"] = torch.zeros(3)
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="missing keys: ln_final.weight.*unexpected keys: visual.latent_vit.extra_token"):
        fastlclip.load(TINY, tmp_path / "bad.pt")


def test_shape_mismatch_names_key_and_fitting_config(official_ckpt):
    fastlclip.add_model_config("tiny", TINY)
    patch8 = {**TINY, "vision_cfg": {**TINY["vision_cfg"], "patch_size": 8}}
    with pytest.raises(CheckpointError, match=r"does not fit config 'custom': .*positional_embedding has shape \(17, 64\).*expects \(5, 64\).*fit.*'tiny'"):
        fastlclip.load(patch8, official_ckpt)
    with pytest.raises(CheckpointError, match=r"does not match config 'Latent-ViT-B-8-512': missing keys.*fit.*'tiny'"):
        fastlclip.load("Latent-ViT-B-8-512", official_ckpt)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fastlclip.load(TINY, tmp_path / "nope.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        fastlclip.load(TINY, tmp_path / "broken.safetensors")
    with zipfile.ZipFile(tmp_path / "trunc.pt", "w") as z:
        z.writestr("junk", "x")
    with pytest.raises(CheckpointError, match="not a readable"):
        fastlclip.load(TINY, tmp_path / "trunc.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        fastlclip.load(TINY, tmp_path / "empty")


def test_hf_hub_offline_not_cached_names_repo_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _reload_hub_constants(monkeypatch, tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"wendlerc/latent-clip-b-8-512-34b-80k.*checkpoints/epoch_34.pt.*HF_HUB_OFFLINE"):
        fastlclip.load(None, "hf-hub:wendlerc/latent-clip-b-8-512-34b-80k")


def test_hf_hub_repo_without_known_file_lists_candidates(tmp_path, monkeypatch):
    _reload_hub_constants(monkeypatch, tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"latent-clip-b-4-512-plus-13b-80k.*open_clip_model.safetensors.*epoch_34.pt"):
        fastlclip.load(None, "hf-hub:wendlerc/latent-clip-b-4-512-plus-13b-80k")


def test_hf_hub_resolves_from_cache_offline(official_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    (snap / "checkpoints").mkdir(parents=True)
    os.link(official_ckpt, snap / "checkpoints" / "epoch_34.pt")
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _reload_hub_constants(monkeypatch, tmp_path / "hf")
    m = fastlclip.load(TINY, "hf-hub:org/tiny/checkpoints/epoch_34.pt")
    assert m.visual.vae_encoder is not None


def _reload_hub_constants(monkeypatch, hf_home):
    """huggingface_hub reads its cache dir and offline flag at import: point them at the test's folder."""
    import huggingface_hub.constants as c
    import huggingface_hub.file_download as fd

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    if hasattr(fd, "HF_HUB_CACHE"):  # huggingface_hub < 0.25 (transformers 4.38's) binds the name at import
        monkeypatch.setattr(fd, "HF_HUB_CACHE", str(hf_home / "hub"))


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="random"):
        fastlclip.load(TINY)


# -- key layouts and config inference, checked by the outputs they give (issue 16, item 7) ---------------


def _reference_outputs(reference, model):
    """The model's image and text features against open_clip's on the same inputs (VAE-space latents)."""
    torch.manual_seed(21)
    z = torch.randn(2, 4, LATENT, LATENT)
    img = (model.encode_latents(z, space="vae", normalize=False) - reference.encode_image(z)).abs().max()
    txt = (model.encode_text(["a cat", "a dog"], normalize=False)
           - reference.encode_text(fastlclip.tokenize(["a cat", "a dog"]))).abs().max()
    return max(img.item(), txt.item())


def test_legacy_vae_attention_names_load_into_the_same_encoder(reference, tmp_path):
    """Old diffusers names (query/key/value/proj_attn) in the VAE's mid-block attention map onto to_q/to_k/to_v/
    to_out.0: dropping or swapping one rename fails (a missing key, or another encoder's output)."""
    from conftest import tiny_vae

    vae = tiny_vae()
    with torch.no_grad():  # non-trivial attention weights, so a swapped rename shows in the output
        for p in vae.encoder.mid_block.attentions.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ck = official_state(reference, vae)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in ck["state_dict"].items():
        if k.startswith("module.visual.vae_encoder.mid_block.attentions."):
            for new, old in renames.items():
                k = k.replace(new, old)
        legacy[k] = v
    assert sum(".query." in k or ".proj_attn." in k for k in legacy) == 4  # weight and bias of two of the four
    torch.save({**ck, "state_dict": legacy}, tmp_path / "legacy.pt")
    model = fastlclip.load(TINY, tmp_path / "legacy.pt")
    torch.manual_seed(22)
    pixels = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        want = reference.encode_image(vae.encode(pixels * 2 - 1).latent_dist.mean)
    assert (model.encode_images(pixels, normalize=False) - want).abs().max() < 1e-5


@pytest.mark.parametrize("layout", ["plain", "module-prefixed", "wrapped"])
def test_plain_open_clip_visual_keys_load(reference, tmp_path, layout):
    """A checkpoint saved from an open_clip CLIP (``visual.conv1.weight``, no ``latent_vit``), bare, with DDP's
    ``module.`` prefix, or under ``state_dict``: the tower's weights land in ``visual.latent_vit``."""
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    assert "visual.conv1.weight" in sd and not any("latent_vit" in k for k in sd)
    if layout != "plain":
        sd = {"module." + k: v for k, v in sd.items()}
    torch.save({"state_dict": sd, "epoch": 3} if layout == "wrapped" else sd, tmp_path / "open_clip.pt")
    model = fastlclip.load(TINY, tmp_path / "open_clip.pt")
    assert model.visual.vae_encoder is None
    assert _reference_outputs(reference, model) < 1e-5


def test_load_without_a_name_infers_the_one_config_that_fits(official_ckpt, reference):
    fastlclip.add_model_config("tiny-test", TINY)
    model = fastlclip.load(None, official_ckpt)
    assert model.cfg.name == "tiny-test" and model.visual.vae_encoder is not None
    assert _reference_outputs(reference, model) < 1e-5


def test_load_without_a_name_refuses_zero_or_several_fitting_configs(official_ckpt):
    with pytest.raises(CheckpointError, match="can't tell the config of epoch_34.pt: no registered config fits"):
        fastlclip.load(None, official_ckpt)
    fastlclip.add_model_config("tiny-a", TINY)
    fastlclip.add_model_config("tiny-b", {**TINY, "vision_cfg": {**TINY["vision_cfg"], "latent_factor": 8}})
    with pytest.raises(CheckpointError, match=r"configs that fit: \['tiny-a', 'tiny-b'\]; pass the model name"):
        fastlclip.load(None, official_ckpt)
