"""Numeric edges and accepted nonsense (issue 22, section 2): each is refused with an error naming the problem."""

import math
import os
import warnings

import pytest
import torch

import fastlclip
from fastlclip import checkpoint, grids, reno
from fastlclip.convert import main as convert_main
from fastlclip.i2p import read_i2p
from fastlclip.safety import LatentSafetyChecker, SafetyGuidance
from conftest import TINY

PROMPT = "a photo of a cat"
SMALL = {"concepts": {"violence": "an image of violence"}, "neutral": "an image"}  # few texts: fast to encode


@pytest.fixture(scope="module")
def model(seeded_tiny_model):
    return seeded_tiny_model


def z(scale=1.0, dtype=torch.float32, shape=(2, 4, 16, 16)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * scale).to(dtype)


# -- finite latents that overflow inside the tower ---------------------------------------------------------
@pytest.mark.parametrize("latents", [z(1e30), z(1e300, torch.float64)], ids=["1e30-fp32", "1e300-fp64"])
def test_overflow_in_the_tower_is_an_error_naming_the_magnitude(model, latents):
    assert torch.isfinite(latents).all()
    reward = fastlclip.LatentCLIPReward(model)
    guidance = SafetyGuidance(model, **SMALL)
    for what, call in (("reward loss", lambda: reward(latents, PROMPT)), ("score", lambda: reward.score(latents, PROMPT)),
                       ("guidance loss", lambda: guidance(latents, PROMPT))):
        with pytest.raises(ValueError, match="overflowed inside the image tower") as e:
            call()
        assert what in str(e.value) and f"{latents.abs().max().item():.3g}" in str(e.value)


def test_overflow_check_follows_check_finite(model):
    reward = fastlclip.LatentCLIPReward(model)
    model.check_finite = False
    try:
        assert not torch.isfinite(reward(z(1e30), PROMPT))  # off: no sync, the NaN is the caller's to see
    finally:
        model.check_finite = True
    assert torch.isfinite(reward(z(), PROMPT))


# -- numbers that are not numbers here ------------------------------------------------------------------------
@pytest.mark.parametrize("w", [math.nan, math.inf, -1.0, True, "1"])
def test_reward_weighting_is_a_finite_number_at_least_zero(model, w):
    with pytest.raises((ValueError, TypeError), match="weighting"):
        fastlclip.LatentCLIPReward(model, weighting=w)


class _Fake:
    name = "fake"

    def __init__(self, weighting):
        self.weighting = weighting

    def __call__(self, latents, prompt):
        return latents.sum()


@pytest.mark.parametrize("w", [math.nan, math.inf, -0.5, True])
def test_reno_refuses_bad_weightings(w):
    with pytest.raises((ValueError, TypeError), match="weighting"):
        reno.WeightedReward([_Fake(w)])
    if w != -0.5:  # explicit weights may be negative: a difference of rewards
        with pytest.raises((ValueError, TypeError), match=r"weights\[0\]"):
            reno.WeightedReward([_Fake(1.0)], weights=[w])


@pytest.mark.parametrize("kw", [{"prompt_weight": math.inf}, {"safety_weight": math.nan}, {"prompt_weight": True}])
def test_guidance_weights(model, kw):
    with pytest.raises((ValueError, TypeError), match=next(iter(kw))):
        SafetyGuidance(model, **SMALL, **kw)


@pytest.mark.parametrize("kw, needle", [({"step_size": math.inf}, "step_size must be a finite positive number, got inf"),
                                        ({"steps": True}, "steps must be an integer"),
                                        ({"start": True}, "start must be a number")])
def test_callback_numbers(model, kw, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        SafetyGuidance(model, **SMALL).callback(PROMPT, **kw)


@pytest.mark.parametrize("thresholds", [True, {"violence": False}, math.nan])
def test_checker_thresholds_are_numbers(model, thresholds):
    with pytest.raises(ValueError, match="thresholds"):
        LatentSafetyChecker(model, **SMALL, thresholds=thresholds)


def test_checker_refuses_a_nan_blank(model):
    blank = torch.zeros(4, 16, 16)
    blank[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN/Inf"):
        LatentSafetyChecker(model, **SMALL, blank=blank)


@pytest.fixture(scope="module")
def generator():
    from bench import tiny

    return reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE,
                                             with_vae=False)


@pytest.mark.parametrize("kw, needle", [({"iterations": True}, "iterations"), ({"lr": True}, "lr"),
                                        ({"lr": math.inf}, "lr"), ({"grad_clip": math.inf}, "grad_clip"),
                                        ({"momentum": math.nan}, "momentum"), ({"reg_weight": True}, "reg_weight"),
                                        ({"seed": 2**70}, r"seed must be an integer in \[0, 2\*\*64\)"),
                                        ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed")])
def test_reno_optimize_arguments(model, generator, kw, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        reno.optimize(generator, fastlclip.LatentCLIPReward(model), PROMPT, progress=False, **kw)


def test_reno_from_config_seed():
    with pytest.raises(ValueError, match="seed"):
        reno.OneStepGenerator.from_config(seed=2**70)


# -- empty texts -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "   ", ["a cat", ""]])
def test_empty_text_is_refused(model, text):
    with pytest.raises(ValueError, match="empty"):
        model.encode_text(text)


def test_all_zero_tokens_are_refused(model):
    tokens = model.tokenize(["a cat", "a dog"])
    tokens[1] = 0
    with pytest.raises(ValueError, match="all zeros"):
        model.encode_text(tokens)


@pytest.mark.parametrize("names", [["cat", ""], ["cat", "  "]])
def test_empty_class_name_is_refused(model, names):
    with pytest.raises(ValueError, match="class name #1 is empty"):
        fastlclip.ZeroShotClassifier(model, names, ["a photo of a {}."])


@pytest.mark.parametrize("batch_size", [True, 0, -1])
def test_classifier_batch_size(model, batch_size):
    with pytest.raises((ValueError, TypeError), match="batch_size"):
        fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}."], batch_size=batch_size)


def test_guidance_refuses_a_blank_concept_name(model):
    with pytest.raises(ValueError, match="non-empty name"):
        SafetyGuidance(model, concepts={" ": ["an image of violence"]}, neutral="an image")


# -- the interpolated positional table sees every write ---------------------------------------------------------
def test_pos_table_cache_sees_writes_through_data(model):
    tower = model.visual.latent_vit
    with torch.no_grad():
        before = tower.pos_embed_for((8, 8)).clone()
        new = torch.randn_like(tower.positional_embedding)
        saved = tower.positional_embedding.detach().clone()
        try:
            tower.positional_embedding.data.copy_(new)  # bypasses the version counter
            after = tower.pos_embed_for((8, 8))
            # independent reference: torch's bicubic antialiased resampling of the new grid part, float64
            g = TINY["vision_cfg"]["image_size"] // TINY["vision_cfg"]["latent_factor"] // TINY["vision_cfg"]["patch_size"]
            img = new[1:].double().reshape(1, g, g, -1).permute(0, 3, 1, 2)
            want = torch.nn.functional.interpolate(img, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
            want = torch.cat([new[:1].double(), want.permute(0, 2, 3, 1).reshape(64, -1)])
            torch.testing.assert_close(after.double(), want, rtol=1e-5, atol=1e-6)
            assert not torch.equal(after, before)
        finally:
            tower.positional_embedding.data.copy_(saved)
        torch.testing.assert_close(tower.pos_embed_for((8, 8)), before, rtol=0, atol=0)


# -- grids -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -2, True, 2.0])
def test_pool_latents_size(size):
    with pytest.raises(ValueError, match="size must be a positive integer"):
        grids.pool_latents(torch.randn(1, 4, 8, 8), size)


def test_pool_latents_empty_grid():
    with pytest.raises(ValueError, match="empty"):
        grids.pool_latents(torch.randn(1, 4, 0, 8), 4)


@pytest.mark.parametrize("grid", [(0, 4), (4, True)])
def test_resize_pos_embed_grid(grid):
    with pytest.raises(ValueError, match="grid must be two positive integers"):
        grids.resize_pos_embed(torch.randn(17, 8), grid)


# -- checkpoints -------------------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_logit_scale_in_a_checkpoint(model, tmp_path, value):
    from safetensors.torch import save_file

    sd = _state(model)
    sd["logit_scale"] = torch.tensor(value)
    save_file(sd, str(tmp_path / "m.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        with pytest.raises(checkpoint.CheckpointError, match=r"NaN/Inf values: \['logit_scale'\]"):
            fastlclip.load(TINY, tmp_path / name)


@pytest.mark.parametrize("kind, make", [("meta-device", lambda v: torch.empty_like(v, device="meta")),
                                        ("sparse", lambda v: v.to_sparse())])
def test_meta_and_sparse_tensors(model, tmp_path, kind, make):
    sd = _state(model)
    sd["text_projection"] = make(sd["text_projection"])
    torch.save(sd, tmp_path / "m.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(checkpoint.CheckpointError, match=f"{kind} tensors.*\\['text_projection'\\]"):
            checkpoint.read_checkpoint(tmp_path / "m.pt")


def test_fifo_is_refused_without_hanging(tmp_path):
    import threading

    fifo = tmp_path / "epoch_1.pt"
    os.mkfifo(fifo)
    errors = []

    def read():
        try:
            checkpoint.read_checkpoint(fifo)
        except checkpoint.CheckpointError as e:
            errors.append(str(e))

    worker = threading.Thread(target=read, daemon=True)  # a hang leaves only a daemon thread behind
    worker.start()
    worker.join(20)
    assert not worker.is_alive(), "reading a FIFO as a checkpoint hangs"
    assert len(errors) == 1 and "not a regular file" in errors[0]


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
def test_unreadable_file_is_a_checkpoint_error():
    with pytest.raises(checkpoint.CheckpointError, match="could not read"):
        checkpoint.read_checkpoint("/proc/self/mem")


def test_convert_refuses_an_existing_destination_and_keeps_no_paths(official_ckpt, tmp_path, capsys):
    from safetensors import safe_open

    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"keep me")
    assert convert_main([str(official_ckpt), str(dst), "--model", "tiny-test"]) == 1
    assert "already exists" in capsys.readouterr().err and dst.read_bytes() == b"keep me"
    fastlclip.add_model_config("tiny-test", TINY)
    assert convert_main([str(official_ckpt), str(dst), "--force"]) == 0
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {checkpoint.SAFETENSORS_CONFIG_KEY}
    assert not any(str(tmp_path) in v or "epoch_34" in v for v in meta.values())
    assert convert_main([str(dst), str(dst), "--force"]) == 1
    assert "is the input" in capsys.readouterr().err


# -- I2P files -------------------------------------------------------------------------------------------------
def test_i2p_duplicate_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,categories,prompt\na cat,,a dog\n")
    with pytest.raises(ValueError, match=r"\['prompt'\] more than once"):
        read_i2p(path)


def test_i2p_nul_bytes(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt\na cat\na d\x00og\n")
    with pytest.raises(ValueError, match="line 3: a NUL byte"):
        read_i2p(path)


def test_i2p_limit_is_not_a_bool(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt\na cat\n")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        read_i2p(path, limit=True)
