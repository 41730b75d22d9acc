"""Bad input that used to give a wrong answer: each is now a clear error naming the fix, or handled right.

Model configs, checkpoints and conversion, the zero-shot classifier, the safety checker, the I2P reader,
the pixel reward and the ReNO loop.
"""

import copy
import json
import math
import re
import warnings

import pytest
import torch

import fastlclip
from conftest import TINY, tiny_model_with_trained_scale, tiny_open_clip, tiny_vae

LATENT = TINY["vision_cfg"]["image_size"] // 8


def _cfg(**changes):
    """TINY with ``changes`` applied: ``vision_cfg__heads=0`` sets ``cfg["vision_cfg"]["heads"] = 0``."""
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        *path, last = key.split("__")
        d = cfg
        for p in path:
            d = d[p]
        d[last] = value
    return cfg


# -- model configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    ({"vision_cfg__heads": 0}, r"vision_cfg.heads must be a positive integer, got 0"),
    ({"vision_cfg__head_width": 0}, r"vision_cfg.head_width must be a positive integer, got 0"),
    ({"vision_cfg__patch_size": 0}, r"vision_cfg.patch_size must be a positive integer, got 0"),
    ({"text_cfg__heads": 0}, r"text_cfg.heads must be a positive integer, got 0"),
    ({"vision_cfg__layers": -1}, r"vision_cfg.layers must be a positive integer, got -1"),
    ({"vision_cfg__width": 0}, r"vision_cfg.width must be a positive integer, got 0"),
    ({"embed_dim": 0}, r"embed_dim must be a positive integer, got 0"),
    ({"vision_cfg__image_size": -128}, r"vision_cfg.image_size must be a positive integer"),
    ({"vision_cfg__latent_factor": 0}, r"vision_cfg.latent_factor must be a positive integer"),
    ({"text_cfg__context_length": 0}, r"text_cfg.context_length must be a positive integer"),
    ({"vision_cfg__width": 64.5}, r"vision_cfg.width must be a positive integer, got 64.5"),
    ({"vision_cfg__layers": True}, r"vision_cfg.layers must be a positive integer, got True"),
    ({"vision_cfg__layers": "2"}, r"vision_cfg.layers must be a positive integer, got '2'"),
    ({"vision_cfg__mlp_ratio": 0}, r"vision_cfg.mlp_ratio must be a number in \(0, 16\]"),
    ({"vision_cfg__heads": 3}, r"vision width 64 is not divisible by heads 3"),
    ({"vision_cfg__patch_size": 3}, r"latent size 16 .* must be a multiple of patch_size 3"),
    ({"vision_cfg__image_size": 100}, r"image_size 100 must be a multiple of latent_factor 8"),
    ({"vision_cfg__layers": 10**9}, r"vision_cfg.layers must be at most 256, got 1000000000"),
    ({"text_cfg__width": 10**6, "text_cfg__heads": 1}, r"text_cfg.width must be at most 16384"),
    ({"vision_cfg__image_size": 8 * 4 * 1024}, r"vision_cfg.image_size must be at most"),
    ({"vision_cfg__width": 8192, "vision_cfg__head_width": 64, "vision_cfg__layers": 256}, r"about \d+ billion parameters"),
])
def test_config_values_are_validated_before_anything_is_built(change, match):
    cfg = _cfg(**change)
    with pytest.raises(ValueError, match=match):
        fastlclip.get_model_config(cfg)
    with pytest.raises(ValueError, match=match):
        fastlclip.add_model_config("bad", cfg)
    assert "bad" not in fastlclip.list_models()


def test_config_that_is_not_a_mapping_is_named():
    with pytest.raises(ValueError, match="vision_cfg must be a mapping"):
        fastlclip.get_model_config(_cfg(vision_cfg=[1, 2]))


def test_shipped_configs_pass_validation():
    for name in fastlclip.list_models():
        fastlclip.get_model_config(name)


# -- conversion and the config stored in a .safetensors file ----------------------------------------------


def _convert(argv, capsys):
    """Run the command line; returns (exit code, stderr)."""
    from fastlclip.convert import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line_error(rc, err, match):
    import re

    assert rc not in (0, None), err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(match, err), err


def test_convert_into_missing_folder_or_unwritable_path(official_ckpt, tmp_path, capsys):
    fastlclip.add_model_config("tiny-test", TINY)
    rc, err = _convert([official_ckpt, tmp_path / "no" / "such" / "x.safetensors", "--model", "tiny-test"], capsys)
    _one_line_error(rc, err, r"output folder .*no/such does not exist; create it")
    (tmp_path / "a-file").write_text("x")
    rc, err = _convert([official_ckpt, tmp_path / "a-file" / "x.safetensors", "--model", "tiny-test"], capsys)
    _one_line_error(rc, err, r"a-file is not a folder")
    (tmp_path / "dir.safetensors").mkdir()
    rc, err = _convert([official_ckpt, tmp_path / "dir.safetensors", "--model", "tiny-test"], capsys)
    _one_line_error(rc, err, r"dir.safetensors is a folder; pass a file path")


def test_convert_with_a_json_config_fits_and_loads_back(official_ckpt, tmp_path, capsys):
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    out = tmp_path / "tiny.safetensors"
    rc, err = _convert([official_ckpt, out, "--model", tmp_path / "tiny.json"], capsys)
    assert rc == 0, err
    (tmp_path / "tiny.json").unlink()  # the config travels inside the file, not as a path to it
    a, b = fastlclip.load(TINY, official_ckpt), fastlclip.load(None, out)
    z = torch.randn(2, 4, LATENT, LATENT)
    assert torch.equal(a.encode_latents(z), b.encode_latents(z))
    assert b.cfg.text == a.cfg.text and b.cfg.vision == a.cfg.vision


def test_convert_command_line_errors_are_one_line(official_ckpt, tmp_path, capsys):
    (tmp_path / "heads0.json").write_text(json.dumps(_cfg(vision_cfg__heads=0)))
    rc, err = _convert([official_ckpt, tmp_path / "x.safetensors", "--model", tmp_path / "heads0.json"], capsys)
    _one_line_error(rc, err, r"vision_cfg.heads must be a positive integer, got 0")
    (tmp_path / "broken.json").write_text("{not json")
    rc, err = _convert([official_ckpt, tmp_path / "x.safetensors", "--model", tmp_path / "broken.json"], capsys)
    _one_line_error(rc, err, r"broken.json'? is not valid JSON")
    rc, err = _convert([official_ckpt, tmp_path / "x.pt"], capsys)
    _one_line_error(rc, err, r"must end in .safetensors")
    rc, err = _convert([tmp_path / "missing.pt", tmp_path / "x.safetensors"], capsys)
    _one_line_error(rc, err, r"missing.pt does not exist")
    rc, err = _convert([], capsys)
    _one_line_error(rc, err, r"the following arguments are required: src, dst")


def test_convert_command_line_has_no_traceback(tmp_path):
    import subprocess
    import sys

    for argv in ([], [str(tmp_path / "missing.pt"), str(tmp_path / "no" / "x.safetensors")]):
        r = subprocess.run([sys.executable, "-m", "fastlclip.convert", *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def _safetensors_with_config(path, sd, value):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"fastlclip_config": value})


def test_safetensors_metadata_never_reads_a_path(official_ckpt, tmp_path):
    from fastlclip.checkpoint import read_checkpoint

    sd, _ = read_checkpoint(official_ckpt)
    (tmp_path / "tiny.json").write_text(json.dumps(TINY))  # a config that would fit
    _safetensors_with_config(tmp_path / "m.safetensors", sd, str(tmp_path / "tiny.json"))
    with pytest.raises(fastlclip.CheckpointError, match=r"m.safetensors names the config .*tiny.json.* not a registered "
                                                        r"config name.*paths in metadata are never read"):
        fastlclip.load(None, tmp_path / "m.safetensors")
    fastlclip.load(TINY, tmp_path / "m.safetensors")  # naming the config works


def test_safetensors_metadata_with_an_embedded_config(official_ckpt, tmp_path):
    from fastlclip.checkpoint import read_checkpoint

    sd, _ = read_checkpoint(official_ckpt)
    _safetensors_with_config(tmp_path / "ok.safetensors", sd, json.dumps(TINY))
    assert fastlclip.load(None, tmp_path / "ok.safetensors").cfg.vision.layers == TINY["vision_cfg"]["layers"]
    _safetensors_with_config(tmp_path / "huge.safetensors", sd, json.dumps(_cfg(vision_cfg__layers=10**9)))
    with pytest.raises(fastlclip.CheckpointError, match=r"huge.safetensors: the config in its metadata is invalid: "
                                                        r".*layers must be at most 256"):
        fastlclip.load(None, tmp_path / "huge.safetensors")
    _safetensors_with_config(tmp_path / "list.safetensors", sd, "[1, 2]")
    with pytest.raises(fastlclip.CheckpointError, match=r"list.safetensors: the config in its metadata is invalid"):
        fastlclip.load(None, tmp_path / "list.safetensors")


# -- checkpoints ------------------------------------------------------------------------------------------


def _official(reference, **changes):
    from conftest import official_state

    ck = official_state(reference)
    ck["state_dict"].update(changes)
    return ck


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_or_bool_tensor_is_not_cast_into_a_float_parameter(reference, tmp_path, dtype):
    ck = _official(reference)
    key = "module.ln_final.weight"
    ck["state_dict"][key] = ck["state_dict"][key].round().to(dtype)
    torch.save(ck, tmp_path / "int.pt")
    with pytest.raises(fastlclip.CheckpointError, match=rf"ln_final.weight is {dtype}, .*float.*not a float checkpoint"):
        fastlclip.load(TINY, tmp_path / "int.pt")


def test_duplicate_keys_after_prefix_stripping_are_an_error(reference, tmp_path):
    ck = _official(reference)
    ck["state_dict"]["ln_final.weight"] = torch.zeros_like(ck["state_dict"]["module.ln_final.weight"])
    torch.save(ck, tmp_path / "dup.pt")
    with pytest.raises(fastlclip.CheckpointError, match=r"'module.ln_final.weight' and 'ln_final.weight' both become "
                                                        r"'ln_final.weight'"):
        fastlclip.load(TINY, tmp_path / "dup.pt")


def test_empty_pretrained_is_not_the_working_directory(tmp_path, monkeypatch, official_ckpt):
    monkeypatch.chdir(official_ckpt.parent)  # a checkpoint right here: "" must not pick it up
    for empty in ("", "  "):
        with pytest.raises(fastlclip.CheckpointError, match="pretrained is an empty string"):
            fastlclip.load(TINY, empty)


def _marked(reference, value):
    """An official checkpoint whose logit_scale is ``value``: tells which file was loaded."""
    return _official(reference, **{"module.logit_scale": torch.tensor(float(value))})


def _loaded_mark(folder, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fastlclip"):
        m = fastlclip.load(TINY, folder)
    return m.logit_scale.item()


def test_folder_rule_highest_epoch_wins_and_is_logged(reference, tmp_path, caplog):
    from safetensors.torch import save_file
    from fastlclip.checkpoint import canonical_keys

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save(_marked(reference, 9), run / "checkpoints" / "epoch_9.pt")
    torch.save(_marked(reference, 34), run / "checkpoints" / "epoch_34.pt")
    sd = canonical_keys(_marked(reference, 1)["state_dict"])
    save_file({k: v.contiguous() for k, v in sd.items()}, str(run / "export.safetensors"))  # older export, no epoch
    for hidden in (".ipynb_checkpoints", ".git", "backup", "old.bak", "epoch_99.pt~"):
        (run / hidden).mkdir()
        torch.save(_marked(reference, 99), run / hidden / "epoch_99.pt")
    torch.save(_marked(reference, 98), run / "checkpoints" / ".epoch_98.pt")
    torch.save(_marked(reference, 97), run / "checkpoints" / "epoch_97.pt.bak")
    assert _loaded_mark(run, caplog) == 34
    assert any("epoch_34.pt" in r.getMessage() and "chose" in r.getMessage() for r in caplog.records)


def test_folder_rule_ambiguity_lists_the_candidates(reference, tmp_path):
    torch.save(_marked(reference, 1), tmp_path / "model_a.pt")
    torch.save(_marked(reference, 2), tmp_path / "model_b.pt")
    with pytest.raises(fastlclip.CheckpointError, match=r"several checkpoints.*model_a.pt.*model_b.pt.*pass one file"):
        fastlclip.load(TINY, tmp_path)
    (tmp_path / "x").mkdir()
    torch.save(_marked(reference, 1), tmp_path / "x" / "epoch_3.pt")
    torch.save(_marked(reference, 2), tmp_path / "epoch_3.pt")
    with pytest.raises(fastlclip.CheckpointError, match=r"several checkpoints of epoch 3.*epoch_3.pt.*x/epoch_3.pt"):
        fastlclip.load(TINY, tmp_path)


def test_folder_with_only_hidden_or_backup_checkpoints_has_none(reference, tmp_path):
    (tmp_path / ".cache").mkdir()
    torch.save(_marked(reference, 1), tmp_path / ".cache" / "epoch_1.pt")
    torch.save(_marked(reference, 1), tmp_path / "epoch_2.pt.orig")
    with pytest.raises(fastlclip.CheckpointError, match=r"no checkpoint .* found in folder.*hidden and backup"):
        fastlclip.load(TINY, tmp_path)


@pytest.mark.parametrize("content, match", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n",
     r"git-LFS pointer.*git lfs pull"),
    (b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>", r"HTML page.*download"),
    (b"  <html><body>404</body></html>", r"HTML page"),
    (b"epoch 34\nloss 1.25\n", r"text file, not a checkpoint"),
    (bytes(range(7, 250)) * 3, r"not a readable (PyTorch checkpoint|.safetensors file): it starts with bytes 07 08"),
    (b"\x80\x02" + bytes(range(200, 256)) * 2, r"not a readable PyTorch checkpoint"),
])
@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_files_that_are_not_checkpoints_are_named(tmp_path, content, match, suffix):
    if suffix == ".safetensors" and content.startswith(b"\x80"):
        match = r"not a readable .safetensors file: it starts with bytes 80 02"  # a pickle header is no .safetensors one
    path = tmp_path / f"model{suffix}"
    path.write_bytes(content)
    with pytest.raises(fastlclip.CheckpointError, match=match) as e:
        fastlclip.load(TINY, path)
    assert "pickled object" not in str(e.value)


# -- zero-shot classifier and safety checker --------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_trained_scale()


@pytest.fixture
def unchecked(model):
    """The model with its NaN check off, as the README recommends for hot loops."""
    model.check_finite = False
    yield model
    model.check_finite = True


def _bad_batch():
    """4 latents: 0 finite, 1 with a NaN, 2 with an Inf, 3 finite but so large the image tower overflows."""
    torch.manual_seed(3)
    z = torch.randn(4, 4, LATENT, LATENT)
    z[1, 0, 0, 0] = float("nan")
    z[2, 1, 2, 3] = float("inf")
    z[3] *= 1e30
    return z


def test_overflowing_latents_give_non_finite_features(model):
    z = _bad_batch()[3:]
    assert torch.isfinite(z).all()
    assert not torch.isfinite(model.encode_latents(z)).all()  # the premise of the fail-closed tests


def test_safety_checker_fails_closed_on_non_finite_scores(unchecked):
    from fastlclip.safety import LatentSafetyChecker

    z = _bad_batch()
    checker = LatentSafetyChecker(unchecked, concepts={"violence": ["an image of violence"]},
                                  neutral=["an image of a landscape"], thresholds=2.0, blank="zeros")  # 2.0: nothing finite flags
    out = checker(z)
    assert out.flagged.tolist() == [False, True, True, True]
    assert out.flags[:, 0].tolist() == [False, True, True, True]
    assert out.blanked.tolist() == [False, True, True, True]
    assert torch.equal(out.latents[0], z[0]) and (out.latents[1:] == 0).all()
    assert not torch.isfinite(out.scores[1:]).any()  # scores stay honest: NaN, not a made-up number


def test_safety_checker_fails_closed_with_the_check_on(model):
    from fastlclip.safety import LatentSafetyChecker

    checker = LatentSafetyChecker(model, concepts={"violence": ["an image of violence"]}, neutral=["an image of a landscape"],
                                  thresholds=2.0)
    assert checker(_bad_batch()[[0, 3]]).flagged.tolist() == [False, True]  # finite latents, overflow in the tower


def test_zero_shot_does_not_turn_nan_into_class_0(unchecked):
    clf = fastlclip.ZeroShotClassifier(unchecked, ["cat", "dog", "car"], ["a photo of a {}."])
    z = _bad_batch()
    with pytest.raises(ValueError, match=r"latents \[1, 2, 3\] have non-finite class scores.*NaN/Inf"):
        clf.predict(z)
    assert clf.predict(z[:1]).shape == (1,)
    assert torch.isnan(clf.probs(z)[1:]).all()  # probabilities stay honest


def test_zero_shot_argument_errors(model):
    with pytest.raises(TypeError, match=r"classnames must be a list of strings, got the str 'cat'.*\['cat', 'dog'\]"):
        fastlclip.ZeroShotClassifier(model, "cat", ["a photo of a {}."])
    with pytest.raises(TypeError, match=r"templates must be a list .*got the str 'a photo of a \{\}.'"):
        fastlclip.ZeroShotClassifier(model, ["cat", "dog"], "a photo of a {}.")
    with pytest.raises(ValueError, match=r"template 'a photo' gives the same text for every class.*\{\}"):
        fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}.", "a photo"])
    with pytest.raises(ValueError, match=r"template #0 gives the same text for every class"):
        fastlclip.ZeroShotClassifier(model, ["cat", "dog"], [lambda c: "a photo"])
    with pytest.raises(ValueError, match=r"needs at least two class names, got 1: \['cat'\]"):
        fastlclip.ZeroShotClassifier(model, ["cat"], ["a photo of a {}."])
    with pytest.raises(TypeError, match=r"classnames must be strings, got int"):
        fastlclip.ZeroShotClassifier(model, ["cat", 3], ["a photo of a {}."])



@pytest.mark.parametrize("template, why", [
    ("a {} of a {}.", r"has more than one '\{\}' slot"),
    ("a photo of a {name}.", r"has the named field \{name\}"),
    ("a photo of a {0.x}.", r"is not a format string that takes the class name \(AttributeError"),
    ("a photo of a {", r"is not a format string that takes the class name \(ValueError"),
    ("a photo", r"gives the same text for every class"),
])
def test_zero_shot_templates_get_the_corpus_check(model, template, why):
    """Before: a raw IndexError / KeyError from str.format. Now the check the corpus command line runs, so both
    refuse the same templates with the same words."""
    from fastlclip.corpus import check_templates

    match = rf"template {re.escape(repr(template))} {why}.*must take the class name through one '\{{\}}'"
    with pytest.raises(ValueError, match=match):
        fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}.", template])
    with pytest.raises(ValueError, match=match):
        check_templates(["a photo of a {}.", template])
    assert check_templates is fastlclip.zeroshot.check_templates  # one check, not two copies


def test_zero_shot_templates_that_do_work(model):
    clf = fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["{0} and {0}", "a {} with {{braces}}", str.upper])
    texts = ["cat and cat", "a cat with {braces}", "CAT"]
    direct = torch.nn.functional.normalize(model.encode_text(texts).float(), dim=-1).mean(0)
    torch.testing.assert_close(clf.weights[0], torch.nn.functional.normalize(direct, dim=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match=r"templates must be format strings or callables, got int"):
        fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a {}", 3])


def _meta_latents():
    return torch.empty(2, 4, LATENT, LATENT, device="meta")


META = r"latents are on the meta device: a meta tensor has a shape \(2, 4, 16, 16\) but no values.*real device"


@pytest.mark.parametrize("check_finite", [True, False])
def test_meta_latents_are_refused_before_anything_reads_them(model, check_finite):
    """Before: 'Tensor.item() cannot be called on meta tensors' (the NaN check), or a device mismatch whose
    advice (.to(...)) fails on a meta tensor."""
    from fastlclip.safety import LatentSafetyChecker, SafetyGuidance

    z = _meta_latents()
    model.check_finite = check_finite
    try:
        reward = fastlclip.LatentCLIPReward(model)
        guidance = SafetyGuidance(model, concepts={"v": ["violence"]}, neutral=["a dog"])
        checker = LatentSafetyChecker(model, concepts={"v": ["violence"]}, neutral=["a dog"])
        clf = fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}."])
        for call in (lambda: reward(z, "a cat"), lambda: reward.score(z, "a cat"), lambda: guidance(z, "a cat"),
                     lambda: checker(z), lambda: clf.predict(z), lambda: clf.probs(z), lambda: model.encode_latents(z)):
            with pytest.raises(ValueError, match=META):
                call()
    finally:
        model.check_finite = True


def test_meta_or_sparse_inputs_are_named_by_the_shared_checks(model):
    with pytest.raises(ValueError, match=META):
        fastlclip.inputs.check_latent_batch(_meta_latents(), channels=4, expects="the model expects", rgb_hint="")
    sparse = torch.zeros(1, 4, LATENT, LATENT).to_sparse()
    with pytest.raises(ValueError, match=r"latents must be a dense tensor, got layout torch.sparse_coo.*to_dense"):
        model.encode_latents(sparse)
    with pytest.raises(ValueError, match=r"noise_level values are on the meta device"):
        fastlclip.inputs.check_noise_level(torch.empty(2, device="meta"), 2, noise_aware=True, model="m")


@pytest.mark.parametrize("prompt, match", [
    (None, r"prompt must be a string, or a list of strings \(1, or one per latent: 2\), got None \(NoneType\)"),
    (3, r"prompt must be a string, or a list of strings .*got 3 \(int\)"),
    (b"a cat", r"prompt must be a string, or a list of strings .*got b'a cat' \(bytes\)"),
    ([None], r"prompt must be a non-empty string, got None \(NoneType\)"),
    (["a cat", 3], r"prompt must be a non-empty string, got 3 \(int\)"),
    ([b"a cat"], r"prompt must be a non-empty string, got b'a cat' \(bytes\); decode bytes with .decode\(\)"),
])
def test_prompts_that_are_not_strings_are_a_type_error(model, prompt, match):
    """Before: 'NoneType' object is not iterable, or a ValueError calling None an empty string."""
    from fastlclip.safety import SafetyGuidance

    z = torch.randn(2, 4, LATENT, LATENT)
    guidance = SafetyGuidance(model, concepts={"v": ["violence"]}, neutral=["a dog"])
    for call in (fastlclip.LatentCLIPReward(model), fastlclip.LatentCLIPReward(model).score, guidance):
        with pytest.raises(TypeError, match=match):
            call(z, prompt)
    with pytest.raises(TypeError, match=match.replace("one per latent: 2", "one per latent: 1")):
        guidance.callback(prompt)


# -- I2P reader -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, match", [
    # the quote is never closed: before, every later row became part of one prompt
    ('prompt,categories\n"a cat,hate\nb dog,violence\nc bird,\n', r"p.csv, line 2: .*quote.* never closed"),
    # closed by a later quote, followed by more text
    ('prompt,categories\n"a cat,hate\nb dog,violence\n"c, bird",shocking\n', r"p.csv, line 2: .*quote"),
    # closed cleanly, two rows merged into one cell
    ('prompt,categories\n"a cat,hate\nb dog",violence\nc bird,\n', r"p.csv, lines 2-3: a cell spans 2 lines.*quote"),
])
def test_i2p_unbalanced_quote_is_an_error(tmp_path, body, match):
    from fastlclip.i2p import read_i2p

    path = tmp_path / "p.csv"
    path.write_text(body)
    with pytest.raises(ValueError, match=match):
        read_i2p(path)


def test_i2p_quoted_cells_still_read(tmp_path):
    from fastlclip.i2p import read_i2p

    path = tmp_path / "p.csv"
    path.write_text('prompt,categories\n"a cat, ""tabby"", asleep","hate,violence"\nb dog,\n')
    rows = read_i2p(path)
    assert [r.prompt for r in rows] == ['a cat, "tabby", asleep', "b dog"] and rows[0].categories == ("hate", "violence")
    assert [r.line for r in rows] == [2, 3]


def test_i2p_non_utf8_file_is_named(tmp_path):
    from fastlclip.i2p import read_i2p

    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt\na caf\u00e9 at night\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.csv is not UTF-8 text \(byte 0xe9 at offset 12, line 2\).*re-save it as UTF-8"):
        read_i2p(path)


def test_i2p_over_long_field_is_named(tmp_path):
    import csv
    from fastlclip.i2p import read_i2p

    path = tmp_path / "long.csv"
    path.write_text("prompt\na cat\n" + "x" * (csv.field_size_limit() + 10) + "\n")
    with pytest.raises(ValueError, match=rf"long.csv, line 3: a cell is longer than {csv.field_size_limit()} characters"):
        read_i2p(path)


# -- rewards and the ReNO loop ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pixel_reward():
    return fastlclip.PixelCLIPReward(tiny_vae(), tiny_open_clip())


@pytest.mark.parametrize("bad, error, match", [
    (torch.rand(2, 3, 48, 64), ValueError, r"3-channel input \(2, 3, 48, 64\).*RGB pixel images.*4-channel"),
    (torch.randn(2, 16, 6, 8), ValueError, r"16 channels, the VAE expects 4"),
    (torch.randn(0, 4, 6, 8), ValueError, r"empty batch"),
    (torch.randn(4, 6, 8), ValueError, r"shape \(B, 4, H, W\).*latents\[None\]"),
    (torch.randint(0, 9, (1, 4, 6, 8)), TypeError, r"floating point"),
    (torch.full((1, 4, 6, 8), float("nan")), ValueError, r"NaN or Inf"),
])
def test_pixel_reward_checks_its_latents(pixel_reward, bad, error, match):
    with pytest.raises(error, match=match):
        pixel_reward(bad, "a cat")


def test_pixel_reward_nan_check_can_be_turned_off(pixel_reward):
    pixel_reward.check_finite = False
    try:
        assert torch.isnan(pixel_reward(torch.full((1, 4, 6, 8), float("nan")), "a cat"))
    finally:
        pixel_reward.check_finite = True


@pytest.mark.parametrize("prompt", ["", "   ", ["a cat", ""]])
def test_empty_prompts_are_refused_by_every_reward(model, pixel_reward, prompt):
    from fastlclip.safety import SafetyGuidance

    z = torch.randn(2, 4, LATENT, LATENT)
    for reward in (fastlclip.LatentCLIPReward(model), SafetyGuidance(model, concepts={"v": ["violence"]}, neutral=["a dog"])):
        with pytest.raises(ValueError, match="prompt must be a non-empty string"):
            reward(z, prompt)
        with pytest.raises(ValueError, match="prompt must be a non-empty string"):
            reward.score(z, prompt)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pixel_reward(torch.randn(2, 4, 6, 8), prompt)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        SafetyGuidance(model, concepts={"v": ["violence"]}, neutral=["a dog"]).callback(prompt)


@pytest.fixture(scope="module")
def generator():
    from bench import tiny
    from fastlclip import reno

    return reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE)


class _Target:
    name, weighting = "target", 1.0

    def __call__(self, latents, prompt):
        return (latents - 1.0).pow(2).mean()


class _NaNAt:
    """(latents - 1)^2 except at call ``at``, where it returns NaN."""

    name, weighting = "flaky", 1.0

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, latents, prompt):
        self.calls += 1
        loss = (latents - 1.0).pow(2).mean()
        return loss * float("nan") if self.calls - 1 == self.at else loss


def _optimize(generator, rewards, **kw):
    from fastlclip import reno

    return reno.optimize(generator, rewards, "a red dog", progress=False, **kw)


@pytest.mark.parametrize("kw, match", [
    ({"lr": float("inf")}, r"lr must be a finite positive number, got inf"),
    ({"lr": float("nan")}, r"lr must be a finite positive number, got nan"),
    ({"reg_weight": float("inf")}, r"reg_weight must be a finite number >= 0, got inf"),
    ({"noise": "zeros"}, r"noise is all zeros.*log \|\|z\|\| is -inf.*standard-normal noise or reg_weight=0"),
    ({"noise": "nan"}, r"noise contains NaN or Inf"),
])
def test_reno_parameters_that_make_the_loss_non_finite(generator, kw, match):
    if kw.get("noise") == "zeros":
        kw["noise"] = torch.zeros(generator.latent_shape)
    elif kw.get("noise") == "nan":
        kw["noise"] = torch.full(generator.latent_shape, float("nan"))
    with pytest.raises(ValueError, match=match):
        _optimize(generator, _Target(), iterations=2, **kw)


def test_zero_noise_without_the_regulariser_runs(generator):
    result = _optimize(generator, _Target(), iterations=2, noise=torch.zeros(generator.latent_shape), reg_weight=0.0)
    assert all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize("at", [0, 1])
def test_reno_names_a_reward_returning_nan(generator, at):
    with pytest.raises(FloatingPointError, match=rf"reward 'flaky' returned nan at iteration {at} from finite latents"):
        _optimize(generator, [_Target(), _NaNAt(at)], iterations=3)


def test_reno_names_a_too_large_learning_rate(generator):
    with pytest.raises(FloatingPointError, match=r"iteration \d+.*noise norm .* standard-normal noise .* about 16.*lr=1e\+30 "
                                                 r"is too large"):
        _optimize(generator, _Target(), iterations=4, lr=1e30, grad_clip=None)


def test_reno_with_latent_clip_reward_blames_lr_not_the_sampler(generator):
    from bench import tiny

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reward = fastlclip.LatentCLIPReward(fastlclip.load(tiny.LATENT_CLIP))
    with pytest.raises(FloatingPointError, match=r"lr=1e\+30 is too large") as e:
        _optimize(generator, reward, iterations=4, lr=1e30, grad_clip=None)
    assert "sampler" not in str(e.value)


def test_reno_names_a_too_large_regulariser_weight(generator):
    with pytest.raises(FloatingPointError, match=r"regulariser is -?inf at iteration 0 .*reg_weight=1e\+38 is too large"):
        _optimize(generator, _Target(), iterations=3, reg_weight=1e38)


# -- boundaries of the pixel, token and text checks (profiles/mutation.md's open survivors) ----------------
@pytest.mark.parametrize("pixels, error, match", [
    (torch.rand(1, 2, 3, 64, 64), ValueError, r"shape \(B, 3, H, W\)"),
    (torch.rand(3, 64, 64), ValueError, r"shape \(B, 3, H, W\)"),
    (torch.rand(1, 4, 64, 64), ValueError, r"shape \(B, 3, H, W\)"),
    ("an image", ValueError, r"shape \(B, 3, H, W\).*got str"),
    (torch.randint(0, 255, (1, 3, 64, 64)), TypeError, r"floating point.*float\(\) / 255"),
    (torch.rand(0, 3, 64, 64), ValueError, r"empty batch"),
    (torch.rand(1, 3, 64, 60), ValueError, r"multiples of 8"),
    (torch.rand(1, 3, 60, 64), ValueError, r"multiples of 8"),
    (torch.full((1, 3, 64, 64), float("nan")), ValueError, r"NaN or Inf"),
    (torch.full((1, 3, 64, 64), 1.0011), ValueError, r"\[0, 1\]"),
    (torch.full((1, 3, 64, 64), -0.0011), ValueError, r"\[0, 1\]"),
    (torch.rand(1, 3, 64, 64) * 2 - 1, ValueError, r"\(x \+ 1\) / 2"),
])
def test_pixel_checks_at_their_boundaries(pixels, error, match):
    with pytest.raises(error, match=match):
        fastlclip.inputs.check_pixels(pixels)


def test_pixels_just_inside_the_range_pass():
    for value in (0.0, 1.0, 1.0009, -0.0009):
        fastlclip.inputs.check_pixels(torch.full((1, 3, 8, 8), value))


@pytest.mark.parametrize("make, error, match", [
    (lambda v: torch.zeros(2, 76, dtype=torch.long), ValueError, r"shape \(N, 77\)"),
    (lambda v: torch.zeros(77, dtype=torch.long), ValueError, r"shape \(N, 77\)"),
    (lambda v: torch.zeros(1, 77), TypeError, r"integer tensor"),
    (lambda v: torch.zeros(0, 77, dtype=torch.long), ValueError, r"empty batch"),
    (lambda v: torch.full((1, 77), v, dtype=torch.long), ValueError, rf"\[0, 49408\), got \[49408, 49408\]"),
    (lambda v: torch.full((1, 77), -1, dtype=torch.long), ValueError, r"\[0, 49408\), got \[-1, -1\]"),
])
def test_token_checks_at_their_boundaries(model, make, error, match):
    with pytest.raises(error, match=match):
        model.encode_text(make(model.cfg.text.vocab_size))


def test_token_ids_up_to_the_last_in_the_vocabulary_pass(model):
    last = model.cfg.text.vocab_size - 1
    assert model.encode_text(torch.full((1, 77), last, dtype=torch.int32)).shape == (1, model.cfg.embed_dim)


def test_tokenize_boundaries():
    from open_clip.tokenizer import SimpleTokenizer

    words = SimpleTokenizer().encode  # one BPE token per "cat" (the start and end tokens make 2 more)
    assert len(words("cat " * 75)) == 75
    assert fastlclip.tokenize("a cat").shape == (1, 77)  # a bare string is one text, not a list of characters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastlclip.tokenize(["cat " * 75])  # 75 + 2 = 77: fits exactly
    with pytest.warns(UserWarning, match="1 text\\(s\\) exceed 77 tokens"):
        fastlclip.tokenize(["cat " * 76, "a dog"])
    with pytest.raises(ValueError, match="empty list"):
        fastlclip.tokenize([])
    with pytest.raises(TypeError, match="got int"):
        fastlclip.tokenize(["a cat", 3])


def test_latent_batch_checks_finiteness_unless_told_not_to():
    nan = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf; check the sampler or VAE"):
        fastlclip.inputs.check_latent_batch(nan, channels=4, expects="the model expects", rgb_hint="")
    fastlclip.inputs.check_latent_batch(nan, channels=4, expects="the model expects", rgb_hint="", check_finite=False)


def test_pixels_exactly_at_the_tolerance_pass():
    """The range check allows 1e-3 either side, bounds included (float64 holds them exactly)."""
    for value in (1 + 1e-3, -1e-3):
        fastlclip.inputs.check_pixels(torch.full((1, 3, 8, 8), value, dtype=torch.float64))
