"""Checkpoint formats, safety against hostile pickles, strict key/shape checks, conversion."""

import os
from pathlib import Path
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
    with pytest.raises(CheckpointError, match="refused|not a readable|nothing in it was run"):
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


# -- gaps found by mutation testing (issue 22 section 5) ----------------------------------------------------------
# Read through fastlclip.checkpoint directly: no model is built, so these stay fast.
from fastlclip import checkpoint as ck  # noqa: E402


def _not_a_checkpoint_message(tmp_path, content, name="model.pt"):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(path)
    return str(e.value)


@pytest.mark.parametrize("start", [b"<head><title>x</title></head>", b"\n <BODY>404</BODY>", b"<?xml version='1.0'?><Error/>",
                                   b"<HTML lang=en>", b"<!DOCTYPE HTML>"])
def test_every_html_or_xml_start_is_named_an_html_page_with_the_fix(tmp_path, start):
    msg = _not_a_checkpoint_message(tmp_path, start)
    assert "is an HTML page, not a checkpoint (a login or error page saved in place of the file?); download the file " \
           "itself, e.g. with huggingface-cli download or the repository's 'resolve' URL" in msg


def test_lfs_pointer_message_gives_both_fixes(tmp_path):
    msg = _not_a_checkpoint_message(tmp_path, b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9\n")
    assert msg.endswith("is a git-LFS pointer file, not the weights: fetch them with `git lfs pull` in its repository "
                        "(or download the file itself, e.g. with huggingface-cli download)")


@pytest.mark.parametrize("content, first", [
    (b"epoch 34\nloss 1.25\n", "epoch 34"),  # the first line, not the second
    (b"a" * 70 + b"\n", "a" * 60),  # cut at 60 characters
    (b"  \n\t\n", ""),  # only white space: nothing to show
    (b"x" * 511 + "\u00e9".encode(), "x" * 60),  # a 2-byte character cut by the 512-byte head is still text
    (b"x" * 510 + "\u20ac".encode(), "x" * 60),  # a 3-byte one cut after 2 bytes
])
def test_text_files_show_their_first_line(tmp_path, content, first):
    msg = _not_a_checkpoint_message(tmp_path, content)
    assert msg.endswith(f"is a text file, not a checkpoint (it starts with {first!r})"), msg


@pytest.mark.parametrize("at", [0, 100, 508])
def test_an_invalid_byte_before_the_last_three_of_the_head_is_binary(tmp_path, at):
    """Only a character cut by the end of the 512-byte head (a start at byte 509 or later) is forgiven."""
    content = b"x" * at + b"\xff" + b"y" * (600 - at)
    msg = _not_a_checkpoint_message(tmp_path, content)
    assert "is not a readable PyTorch checkpoint: it starts with bytes " in msg and "text file" not in msg


def test_binary_files_show_twelve_bytes_and_what_the_format_starts_with(tmp_path):
    content = bytes(range(7, 250)) * 3
    shown = "07 08 09 0a 0b 0c 0d 0e 0f 10 11 12"
    msg = _not_a_checkpoint_message(tmp_path, content)
    assert msg.endswith(f"model.pt is not a readable PyTorch checkpoint: it starts with bytes {shown}, where one starts "
                        "with a zip or pickle header; is the file complete?"), msg
    msg = _not_a_checkpoint_message(tmp_path, content, "model.safetensors")
    assert msg.endswith(f"model.safetensors is not a readable .safetensors file: it starts with bytes {shown}, where a "
                        ".safetensors file starts with its header length and '{'; is the file complete?"), msg


def _touch(folder, *names):
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")


def _chosen(folder, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fastlclip.checkpoint"):
        caplog.clear()
        path = ck._pick_file(folder)
    return path.relative_to(folder).as_posix(), [r.getMessage() for r in caplog.records]


def test_folder_rule_only_checkpoint_ignores_other_files_and_logs_why(tmp_path, caplog):
    _touch(tmp_path, "model.pt", "README.md", "config.json", "notes.txt")
    rel, logs = _chosen(tmp_path, caplog)
    assert rel == "model.pt"
    assert logs == [f"{tmp_path}: chose model.pt (the only checkpoint; 1 candidate(s))"]


def test_folder_rule_only_safetensors_beside_pickles(tmp_path, caplog):
    _touch(tmp_path, "a.pt", "b.bin", "sub/export.safetensors")
    rel, logs = _chosen(tmp_path, caplog)
    assert rel == "sub/export.safetensors"
    assert logs == [f"{tmp_path}: chose sub/export.safetensors (the only .safetensors beside pickles; 3 candidate(s))"]
    _touch(tmp_path, "other.safetensors")  # two of them: ambiguous
    with pytest.raises(CheckpointError, match=r"several checkpoints .*'a.pt', 'b.bin', 'other.safetensors', "
                                              r"'sub/export.safetensors'\], none named epoch_N"):
        ck._pick_file(tmp_path)


def test_folder_rule_a_lone_safetensors_is_found(tmp_path, caplog):
    _touch(tmp_path, "deep/model.safetensors")
    assert _chosen(tmp_path, caplog)[0] == "deep/model.safetensors"


def test_folder_rule_searches_four_levels_down_and_no_deeper(tmp_path, caplog):
    _touch(tmp_path, "1/2/3/4/5/epoch_9.pt")  # five folders down: not searched
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ck._pick_file(tmp_path)
    _touch(tmp_path, "1/2/3/4/epoch_2.pt")  # four folders down: found
    assert _chosen(tmp_path, caplog)[0] == "1/2/3/4/epoch_2.pt"


def _fake_hub(monkeypatch, found=()):
    """huggingface_hub.hf_hub_download recorded; only the names in ``found`` exist."""
    import huggingface_hub

    calls = []

    def download(repo, name, cache_dir=None):
        calls.append((repo, name, cache_dir))
        if name in found:
            return f"/hub/{repo}/{name}"
        raise FileNotFoundError(name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    return calls


def test_hf_hub_spec_names_repo_file_and_cache(monkeypatch):
    calls = _fake_hub(monkeypatch, found=("weights/model.pt", "model.pt"))
    assert ck._hub_download("hf-hub:org/repo/weights/model.pt", cache_dir="/c") == Path("/hub/org/repo/weights/model.pt")
    assert calls == [("org/repo", "weights/model.pt", "/c")]
    calls.clear()
    assert ck._hub_download("hf-hub:org/repo/model.pt/") == Path("/hub/org/repo/model.pt")  # slashes stripped
    assert calls == [("org/repo", "model.pt", None)]
    calls.clear()
    ck._hub_download("hf-hub:Xorg/modelX/model.pt")  # only slashes are stripped
    assert calls == [("Xorg/modelX", "model.pt", None)]
    calls.clear()
    with pytest.raises(CheckpointError, match="does not exist"):  # the fake's path: read_checkpoint passes cache_dir on
        ck.read_checkpoint("hf-hub:org/repo/model.pt", cache_dir="/hf-cache")
    assert calls == [("org/repo", "model.pt", "/hf-cache")]


def test_hf_hub_published_repo_asks_for_its_file_and_others_for_the_defaults(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = _fake_hub(monkeypatch)
    with pytest.raises(CheckpointError):
        ck._hub_download("hf-hub:wendlerc/latent-clip-b-8-512-34b-80k")
    assert [c[1] for c in calls] == ["checkpoints/epoch_34.pt"]
    calls.clear()
    with pytest.raises(CheckpointError) as e:
        ck._hub_download("hf-hub:/org/unknown/", cache_dir="/c")
    assert calls == [("org/unknown", n, "/c") for n in
                     ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "checkpoints/epoch_34.pt")]
    assert ("tried open_clip_model.safetensors: FileNotFoundError; open_clip_pytorch_model.bin: FileNotFoundError; "
            "checkpoints/epoch_34.pt: FileNotFoundError)") in str(e.value)
    assert "HF_HUB_OFFLINE" not in str(e.value)


@pytest.mark.parametrize("value, named", [("1", True), ("true", True), ("YES", True), ("On", True), ("0", False),
                                          ("off", False)])
def test_hf_hub_offline_hint_follows_the_variable(monkeypatch, value, named):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    _fake_hub(monkeypatch)
    with pytest.raises(CheckpointError) as e:
        ck._hub_download("hf-hub:org/repo/x.pt")
    assert ("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache." in str(e.value)) is named


def test_canonical_keys_maps_each_layout_by_hand():
    t = [torch.full((1,), float(i)) for i in range(8)]
    got = ck.canonical_keys({
        "module.visual.conv1.weight": t[0],  # plain open_clip tower under DDP
        "visual.vae_encoder.conv_in.weight": t[1],  # the VAE stays where it is
        "visual.vae_quant_conv.weight": t[2],
        "visual.vae_encoder.mid_block.attentions.0.query.weight": t[3],
        "visual.vae_encoder.mid_block.attentions.0.key.bias": t[4],
        "visual.vae_encoder.mid_block.attentions.0.value.weight": t[5],
        "visual.vae_encoder.mid_block.attentions.0.proj_attn.bias": t[6],
        "module.logit_scale": t[7],
    })
    assert list(got) == [
        "visual.latent_vit.conv1.weight", "visual.vae_encoder.conv_in.weight", "visual.vae_quant_conv.weight",
        "visual.vae_encoder.mid_block.attentions.0.to_q.weight", "visual.vae_encoder.mid_block.attentions.0.to_k.bias",
        "visual.vae_encoder.mid_block.attentions.0.to_v.weight",
        "visual.vae_encoder.mid_block.attentions.0.to_out.0.bias", "logit_scale"]
    assert all(v is t[i] for i, v in enumerate(got.values()))
    # a latent_vit layout anywhere: visual.* keys are left as they are
    assert list(ck.canonical_keys({"visual.latent_vit.conv1.weight": t[0], "visual.proj": t[1]})) == [
        "visual.latent_vit.conv1.weight", "visual.proj"]


@pytest.mark.parametrize("kind, make, fix", [
    ("meta-device tensors (shapes without data)", lambda v: torch.empty_like(v, device="meta"),
     "save the state dict of a model whose weights were loaded"),
    ("sparse tensors", lambda v: v.to_sparse(), "save dense tensors (.to_dense())"),
    ("quantized tensors", lambda v: torch.quantize_per_tensor(v, 0.1, 0, torch.qint8),
     "save the float weights (.dequantize())"),
    ("NaN/Inf values", lambda v: v.fill_(float("inf")), "the weights are corrupt or diverged in training; use another "
                                                         "checkpoint"),
])
def test_unloadable_tensors_are_named_with_the_fix(tmp_path, kind, make, fix):
    sd = {f"w{i}": torch.ones(2, 3) for i in range(7)}
    sd["n"] = torch.arange(3)  # an integer tensor is never "NaN/Inf"
    for i in range(7):
        sd[f"w{i}"] = make(sd[f"w{i}"])
    with pytest.raises(CheckpointError) as e:
        ck._check_tensors(Path("m.pt"), sd)
    assert str(e.value) == f"m.pt holds {kind}: ['w0', 'w1', 'w2', 'w3', 'w4'] ...; {fix}"
    with pytest.raises(CheckpointError) as e:
        ck._check_tensors(Path("m.pt"), {"w0": sd["w0"], "n": sd["n"]})
    assert str(e.value) == f"m.pt holds {kind}: ['w0']; {fix}"


def test_a_refused_object_is_named_by_its_import_path(tmp_path):
    """torch says "Unsupported global: GLOBAL fractions.Fraction ...": the message names the object, not "GLOBAL"."""
    import fractions

    torch.save({"state_dict": {"w": torch.ones(1)}, "ratio": fractions.Fraction(1, 3)}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"carries a pickled object fastlclip does not allow \(fractions\.Fraction\); "
                                              r"nothing in it was run"):
        ck.read_checkpoint(tmp_path / "m.pt")


def _legacy_save(obj, path, replace=()):
    """torch.save's legacy (non-zip) format, whose pickles are one stream: byte edits need no offsets fixed."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    for old, new in replace:
        assert old in data
        data = data.replace(old, new)
    path.write_bytes(data)


def test_numpy_scalars_of_every_kind_load_under_the_numpy_1_and_2_names(tmp_path):
    """Official checkpoints were pickled under numpy 1.x (``numpy.core.multiarray.scalar``); numpy 2 writes
    ``numpy._core``. Unsigned and complex scalars need their dtype classes allowed too. Reading them warns of
    nothing (numpy 2 deprecates touching ``numpy.core``)."""
    import warnings

    import numpy as np

    meta = {"epoch": np.int64(34), "u8": np.uint8(3), "u16": np.uint16(4), "u32": np.uint32(5), "u64": np.uint64(6),
            "c64": np.complex64(1 + 2j), "c128": np.complex128(2 - 1j), "ok": np.bool_(True), "h": np.float16(0.5),
            "lr": np.float64(5e-4)}
    want = {"epoch": "34", "u8": "3", "u16": "4", "u32": "5", "u64": "6", "c64": "(1+2j)", "c128": "(2-1j)",
            "ok": "True", "h": "0.5", "lr": "0.0005"}
    for name, replace in (("numpy2.pt", ()), ("numpy1.pt", ((b"numpy._core.multiarray", b"numpy.core.multiarray"),))):
        _legacy_save({"state_dict": {"w": torch.arange(3.0)}, **meta}, tmp_path / name, replace)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sd, got = ck.read_checkpoint(tmp_path / name)
        assert got == want and torch.equal(sd["w"], torch.tensor([0.0, 1.0, 2.0]))


def test_a_checkpoint_saved_on_a_gpu_loads_onto_the_cpu(tmp_path):
    """Training checkpoints record their tensors' device (``cuda:0``); they are read onto the CPU whatever
    this machine has."""
    _legacy_save({"state_dict": {"w": torch.tensor([1.5, -2.0])}}, tmp_path / "gpu.pt",
                 [(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")])
    sd, _ = ck.read_checkpoint(tmp_path / "gpu.pt")
    assert sd["w"].device == torch.device("cpu") and sd["w"].tolist() == [1.5, -2.0]


def test_format_check_reads_the_first_512_bytes_only(tmp_path):
    """A long text file with binary bytes past the head is still named a text file (and is not read whole)."""
    msg = _not_a_checkpoint_message(tmp_path, b"x" * 600 + b"\xff" * 10)
    assert msg.endswith(f"is a text file, not a checkpoint (it starts with {'x' * 60!r})"), msg


@pytest.mark.parametrize("content, name, reaches", [
    (b"\x01\0\0\0\0\0\0\0{", "m.safetensors", "is not a readable .safetensors file (Error"),  # 9 bytes: a header start
    (b"PK\x05\x06" + b"\0" * 18, "m.pt", "is not a readable PyTorch checkpoint (its pickle is corrupt)"),  # empty zip
    (b"\x80\x05" + b"\0" * 30, "m.pt", "is a bare pickle of protocol 5"),  # torch's safe reader refuses protocol 5
])
def test_format_check_passes_every_checkpoint_header_to_its_reader(tmp_path, content, name, reaches):
    msg = _not_a_checkpoint_message(tmp_path, content, name)
    assert reaches in msg and "it starts with bytes" not in msg, msg


@pytest.mark.parametrize("content", [b"\x80\x01" + b"\0" * 30, b"\x00\x02" + b"\0" * 30, b"PK\x01\x02" + b"\0" * 30])
def test_format_check_refuses_other_binary_headers(tmp_path, content):
    msg = _not_a_checkpoint_message(tmp_path, content)
    assert f"is not a readable PyTorch checkpoint: it starts with bytes {content[:12].hex(' ')}, where" in msg, msg


def test_a_loader_error_is_shown_on_one_line_cut_at_200_characters(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("bad  zip\n\tentry:" + " x" * 150)

    monkeypatch.setattr(torch, "load", fail)
    path = tmp_path / "m.pt"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 60)
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(path)
    detail = ("bad zip entry:" + " x" * 150)[:200]
    assert str(e.value) == f"{path} is not a readable PyTorch checkpoint (RuntimeError: {detail}); is the file complete?"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_torch_save_of_every_pickle_protocol_reaches_the_loader(tmp_path, protocol):
    """torch.save's pre-zip format is a bare pickle stream (``\\x80`` then the protocol byte, 2 to 5). Protocols
    2 and 3 read; torch's weights-only reader refuses 4 and 5 (their FRAME opcode): the error says so and how to
    re-save the file, not that the file is corrupt."""
    torch.save({"state_dict": {"module.w": torch.tensor([0.25, 4.0])}, "epoch": 7}, tmp_path / "old.pt",
               _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert (tmp_path / "old.pt").read_bytes()[:2] == bytes([0x80, protocol])
    if protocol <= 3:
        sd, meta = ck.read_checkpoint(tmp_path / "old.pt")
        assert list(sd) == ["w"] and sd["w"].tolist() == [0.25, 4.0] and meta == {"epoch": "7"}
    else:
        with pytest.raises(CheckpointError, match=rf"old.pt is a bare pickle of protocol {protocol} \(a legacy, "
                                                  r"pre-zip torch.save file\?\), .* re-save it") as e:
            ck.read_checkpoint(tmp_path / "old.pt")
        assert "it starts with bytes" not in str(e.value) and "corrupt" not in str(e.value)


def test_metadata_is_the_wrappers_scalars_and_a_bare_state_dict_has_none(tmp_path):
    """A training checkpoint's scalar entries (str, int, float, numpy scalars) become the metadata, as text; dicts,
    lists and tensors beside the state dict (optimizer, scheduler) do not. A bare state dict has no metadata."""
    import numpy as np

    w = torch.tensor([1.0, 2.0])
    torch.save({"state_dict": {"w": w}, "epoch": 3, "lr": 0.5, "name": "run", "step": np.int64(9),
                "optimizer": {"state": {}}, "history": [1, 2], "ema": torch.zeros(2), "note": None}, tmp_path / "a.pt")
    sd, meta = ck.read_checkpoint(tmp_path / "a.pt")
    assert meta == {"epoch": "3", "lr": "0.5", "name": "run", "step": "9"} and torch.equal(sd["w"], w)
    torch.save({"w": w}, tmp_path / "bare.pt")
    sd, meta = ck.read_checkpoint(tmp_path / "bare.pt")
    assert meta == {} and isinstance(meta, dict) and torch.equal(sd["w"], w)


@pytest.mark.parametrize("obj, listed", [
    ([torch.zeros(2)], "list"),
    (torch.zeros(2), "Tensor"),
    ({"w": torch.zeros(2), "step": 3}, "['w', 'step']"),
    ({"state_dict": {"w": torch.zeros(2), "config": "x"}}, "['w', 'config']"),
])
def test_a_pickle_that_is_not_a_state_dict_of_tensors_is_refused(tmp_path, obj, listed):
    torch.save(obj, tmp_path / "m.pt")
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(tmp_path / "m.pt")
    assert str(e.value) == f"{tmp_path / 'm.pt'} holds no state dict of tensors (keys: {listed})"


def test_a_refused_tensor_names_the_file_it_is_in(tmp_path):
    torch.save({"logit_scale": torch.tensor(float("nan"))}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError) as e:
        ck.read_checkpoint(tmp_path / "nan.pt")
    assert str(e.value).startswith(f"{tmp_path / 'nan.pt'} holds NaN/Inf values: ['logit_scale']; ")
