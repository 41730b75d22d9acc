"""Latent-space safety on tiny random models: guidance, the diffusers callback, the checker, the I2P reader, the eval."""

import math
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from conftest import TINY, tiny_model_with_trained_scale, tiny_noise_aware
from fastlclip.i2p import I2P_CATEGORIES, read_i2p
from fastlclip.safety import DEFAULT_CONCEPTS, LatentSafetyChecker, SafetyCallback, SafetyGuidance

LATENT = TINY["vision_cfg"]["image_size"] // 8
DATA = Path(__file__).parent / "data" / "i2p_tiny.csv"
CONCEPTS = {"violence": ["an image of violence"], "sexual": ["an image of nudity"]}
NEUTRAL = ["an image of a landscape"]
PROMPT = "a bowl of fruit on a table"


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_trained_scale()


def guidance(model, **kw):
    return SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, **kw)


def descend(loss_fn, z, steps, size=0.5):
    """Normalised gradient steps of L2 length ``size`` per sample."""
    for _ in range(steps):
        z.requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(z), z)
        z = (z - size * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).detach()
    return z


@pytest.fixture(scope="module")
def harmful(model):
    """Latents the 'violence' concept beats the neutral reference on (score > 0): what guidance must move away from."""
    g = guidance(model)
    torch.manual_seed(1)
    z = torch.randn(4, 4, LATENT, LATENT)
    for _ in range(30):
        if (g.concept_scores(z)[:, 0] > 0.01).all():
            return z
        z = descend(lambda x: -g.concept_scores(x)[:, 0].sum(), z, 1)
    raise AssertionError("could not build latents that score above the neutral reference")


# -- guidance ---------------------------------------------------------------------------------------------


def test_default_concepts_cover_i2p(model):
    assert tuple(DEFAULT_CONCEPTS) == I2P_CATEGORIES
    assert SafetyGuidance(model).categories == list(I2P_CATEGORIES)


def test_guidance_moves_away_from_concept_and_keeps_prompt(model, harmful):
    full, prompt_only, safety_only = guidance(model), guidance(model, safety_weight=0), guidance(model, prompt_weight=0)
    with torch.no_grad():
        before, prompt_before = full.concept_scores(harmful), full.score(harmful, PROMPT)
    after = {}
    for name, g in (("full", full), ("prompt_only", prompt_only), ("safety_only", safety_only)):
        z = descend(lambda x: g(x, PROMPT), harmful.clone(), 5)
        with torch.no_grad():
            after[name] = (full.concept_scores(z)[:, 0], full.score(z, PROMPT))
    # The safety term alone lowers the violence score (cosine to it relative to the neutral one) on every sample.
    assert (after["safety_only"][0] < before[:, 0]).all()
    # With the prompt term: the score falls further than the prompt term alone takes it, and the prompt is kept.
    assert (after["full"][0] < before[:, 0]).all()
    assert (after["full"][0] < after["prompt_only"][0]).all()
    assert (after["full"][1] > prompt_before).all()


def test_guidance_value_and_gradients_reach_latents_only(model):
    g = guidance(model, weighting=2.0, safety_weight=0.5)
    assert g.weighting == 2.0 and g.name == "latent_safety"
    z = torch.randn(3, 4, LATENT, LATENT, requires_grad=True)
    loss = g(z, PROMPT)
    with torch.no_grad():
        img = model.encode_latents(z)
        s = model.logit_scale.exp()
        cos = img @ torch.cat([g.concepts.features, model.encode_text([PROMPT])]).T  # concepts, neutral, prompt
        logits = s * cos[:, :-1]
        want = (100 - s * cos[:, -1].mean()) + 0.5 * (torch.logsumexp(logits, -1) - logits[:, -1]).mean()
    assert loss.ndim == 0 and loss.item() == pytest.approx(want.item(), abs=1e-4)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_guidance_errors(model):
    with pytest.raises(ValueError, match="both 0"):
        guidance(model, prompt_weight=0, safety_weight=0)
    with pytest.raises(ValueError, match="safety_weight must be a finite number >= 0"):
        guidance(model, safety_weight=-1)
    with pytest.raises(ValueError, match="non-empty mapping"):
        SafetyGuidance(model, concepts={})
    with pytest.raises(ValueError, match="at least one non-empty text"):
        SafetyGuidance(model, concepts={"violence": []})
    with pytest.raises(ValueError, match="neutral must be"):
        SafetyGuidance(model, concepts=CONCEPTS, neutral=[])
    with pytest.raises(ValueError, match="2 prompts for a batch of 3"):
        guidance(model)(torch.randn(3, 4, LATENT, LATENT), ["a", "b"])


def test_guidance_in_reno_loop():
    from bench import tiny
    from fastlclip import reno

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = SafetyGuidance(fastlclip.load(tiny.LATENT_CLIP), concepts=CONCEPTS, neutral=NEUTRAL)
    generator = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE, width=tiny.IMAGE_SIZE,
                                                  with_vae=False)
    result = reno.optimize(generator, g, PROMPT, iterations=3, progress=False)
    losses = result.component_losses["latent_safety"]
    assert len(losses) == 3 and result.losses == losses  # one reward of weighting 1
    cond = generator.encode_prompt(PROMPT)
    noise0 = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(0))  # optimize's seed=0 noise
    with torch.no_grad():
        assert losses[0] == pytest.approx(g(generator(noise0, cond), PROMPT).item(), abs=1e-4)
        assert result.best_loss == min(losses) and losses[result.best_iteration] == result.best_loss
        torch.testing.assert_close(generator(result.best_noise, cond), result.best_latents)
        assert result.best_loss == pytest.approx(g(result.best_latents, PROMPT).item(), abs=1e-4)
    assert min(losses[1:]) < losses[0]  # the steps lowered the guidance loss


# -- diffusers callback -----------------------------------------------------------------------------------


class FakePipe:
    """What the callback reads from a diffusers pipeline."""

    num_timesteps = 4


def run_fake_pipeline(pipe, latents, callback, tensor_inputs=("latents",)):
    """The callback protocol of diffusers' SDXL denoising loop (under no_grad, as the pipelines run); latents per step."""
    seen = []
    with torch.no_grad():
        for i, t in enumerate(torch.tensor([999, 749, 499, 249])):
            latents = latents * 1.0  # stands in for scheduler.step
            kwargs = {k: latents for k in tensor_inputs}
            latents = callback(pipe, i, t, kwargs).pop("latents", latents)
            seen.append(latents)
    return seen


def test_callback_with_fake_pipeline(model, harmful):
    g = guidance(model)
    callback = g.callback(PROMPT, steps=2, start=0.5)
    assert isinstance(callback, SafetyCallback) and callback.tensor_inputs == ("latents",)
    start = harmful.to(torch.bfloat16)
    seen = run_fake_pipeline(FakePipe(), start, callback)
    assert torch.equal(seen[0], start) and torch.equal(seen[1], start)  # before start * num_timesteps: untouched
    assert not torch.equal(seen[2], seen[1]) and not torch.equal(seen[3], seen[2])
    assert seen[-1].dtype == torch.bfloat16 and not seen[-1].requires_grad
    step = (seen[-1].float() - start.float()).flatten(1).norm(dim=1)
    assert torch.allclose(step, torch.full_like(step, 4 * 0.5), rtol=0.05)  # 4 steps of length 0.5, in bf16
    with torch.no_grad():
        assert (g.concept_scores(seen[-1].float())[:, 0] < g.concept_scores(harmful)[:, 0]).all()


def test_callback_errors(model, harmful):
    g = guidance(model)
    with pytest.raises(KeyError, match=r"callback_on_step_end_tensor_inputs=\['latents'\]"):
        run_fake_pipeline(FakePipe(), harmful, g.callback(PROMPT), tensor_inputs=("prompt_embeds",))
    with pytest.raises(AttributeError, match="num_timesteps"):
        run_fake_pipeline(object(), harmful, g.callback(PROMPT, start=0.5))
    assert len(run_fake_pipeline(object(), harmful, g.callback(PROMPT, steps=1, start=0))) == 4
    with pytest.raises(ValueError, match="start must be"):
        g.callback(PROMPT, start=1.0)
    with pytest.raises(ValueError, match="steps must be"):
        g.callback(PROMPT, steps=0)


# -- checker ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def latents():
    torch.manual_seed(2)
    return torch.randn(8, 4, LATENT, LATENT)


def test_checker_flags_exactly_scores_above_threshold(model, latents):
    checker = LatentSafetyChecker(model)
    scores = checker.scores(latents)
    assert scores.shape == (8, len(I2P_CATEGORIES)) and scores.dtype == torch.float32
    # Thresholds between computed scores: per category, the median splits the batch.
    thresholds = dict(zip(checker.categories, scores.median(dim=0).values.tolist()))
    out = LatentSafetyChecker(model, thresholds=thresholds)(latents)
    want = scores > torch.tensor(list(thresholds.values()))
    assert out.flags.shape == (8, len(I2P_CATEGORIES)) and out.categories == list(I2P_CATEGORIES)
    assert torch.equal(out.flags, want) and torch.equal(out.flagged, want.any(1))
    assert 0 < out.flags.sum() < out.flags.numel()
    assert torch.equal(out.latents, latents) and not out.blanked.any()  # report only, by default


@pytest.mark.parametrize("blank", ["zeros", "constant"])
def test_checker_blanks_only_flagged(model, latents, blank):
    scores = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL).scores(latents)
    threshold = scores[:, 0].median().item()
    fill = torch.full((4, LATENT, LATENT), 0.25)
    checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds={"violence": threshold, "sexual": 2.0},
                                  blank="zeros" if blank == "zeros" else fill)
    original = latents.clone()
    out = checker(latents)
    flagged = scores[:, 0] > threshold
    assert torch.equal(out.flagged, flagged) and torch.equal(out.blanked, flagged) and 0 < flagged.sum() < 8
    expect = torch.zeros_like(fill) if blank == "zeros" else fill
    assert all(torch.equal(out.latents[i], expect if flagged[i] else latents[i]) for i in range(8))
    assert torch.equal(latents, original)  # never in place


def test_checker_one_forward_per_batch_text_cached(model, latents, monkeypatch):
    checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL)
    calls = {"text": 0, "latents": 0}
    encode_text, encode_latents = model.encode_text, model.encode_latents
    monkeypatch.setattr(model, "encode_text", lambda *a, **k: calls.__setitem__("text", calls["text"] + 1) or encode_text(*a, **k))
    monkeypatch.setattr(model, "encode_latents",
                        lambda *a, **k: calls.__setitem__("latents", calls["latents"] + 1) or encode_latents(*a, **k))
    for _ in range(3):
        checker(latents)
    assert calls == {"text": 0, "latents": 3}


def test_checker_matches_manual_scores(model, latents):
    checker = LatentSafetyChecker(model, concepts={"violence": ["an image of violence", "an image of a fight"]}, neutral=NEUTRAL)
    with torch.no_grad():
        img = model.encode_latents(latents)
        concept = F.normalize(model.encode_text(["an image of violence", "an image of a fight"]).mean(0), dim=-1)
        neutral = model.encode_text(NEUTRAL)[0]
    assert torch.allclose(checker.scores(latents)[:, 0], img @ concept - img @ neutral, atol=1e-5)


def test_checker_errors(model, latents):
    with pytest.raises(ValueError, match=r"unknown categories \['nudity'\]"):
        LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds={"nudity": 0.1})
    with pytest.raises(ValueError, match="cosine margins"):
        LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=5.0)
    with pytest.raises(ValueError, match="blank must be"):
        LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, blank="black")
    checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, blank=torch.zeros(4, 8, 8))
    with pytest.raises(ValueError, match="pass one latent of shape"):
        checker(latents)


# -- I2P reader -------------------------------------------------------------------------------------------


def test_i2p_reader_parses_quoting_and_categories():
    rows = read_i2p(DATA)
    assert len(rows) == 6
    assert rows[0].prompt == "a red apple on a wooden table, studio light" and rows[0].categories == ("shocking",)
    assert rows[1].categories == ("hate", "harassment") and rows[1].hard is True
    assert rows[2].prompt == 'a knight in armour, oil painting, dramatic "chiaroscuro" light'
    assert rows[2].categories == ("violence", "illegal activity")
    assert rows[4].inappropriate_percentage == 55.5 and rows[4].nudity_percentage == 30.0
    assert rows[5].categories == () and rows[5].inappropriate_percentage is None and rows[5].hard is False
    assert rows[0].extra == {"prompt_toxicity": "0.02", "sd_seed": "11"}
    assert [r.prompt for r in read_i2p(DATA, limit=2)] == [r.prompt for r in rows[:2]]


def test_i2p_reader_tolerates_missing_optional_columns(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("\ufeffprompt\n\"a dog, running\"\na cat\n\n", encoding="utf-8")  # BOM, quoting, blank line
    rows = read_i2p(path)
    assert [r.prompt for r in rows] == ["a dog, running", "a cat"]
    assert rows[0].categories == () and rows[0].hard is None and rows[0].nudity_percentage is None and rows[0].extra == {}


def test_i2p_reader_errors(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("text,categories\na cat,hate\n")
    with pytest.raises(ValueError, match=r"no 'prompt' column \(columns: \['text', 'categories'\]\)"):
        read_i2p(path)
    path.write_text("prompt,inappropriate_percentage\na cat,lots\n")
    with pytest.raises(ValueError, match="line 2: column 'inappropriate_percentage' must be a number"):
        read_i2p(path)
    path.write_text("prompt,hard\na cat,maybe\n")
    with pytest.raises(ValueError, match="'hard' must be 0/1"):
        read_i2p(path)
    path.write_text("prompt,categories\na cat,hate,harassment\n")
    with pytest.raises(ValueError, match="quote cells that contain commas"):
        read_i2p(path)
    path.write_text("prompt,categories\n ,hate\na cat,\n")
    with pytest.warns(UserWarning, match="skipped 1 row"):
        assert [r.prompt for r in read_i2p(path)] == ["a cat"]
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_i2p(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_i2p(tmp_path / "missing.csv")


# -- evaluation command -----------------------------------------------------------------------------------


def test_rate_tables():
    from bench.safety_eval import rate_tables

    rows = read_i2p(DATA, limit=3)  # categories: shocking | hate, harassment | violence, illegal activity
    base = torch.tensor([[True, False], [False, False], [False, True]])
    guided = torch.tensor([[False, False], [False, False], [False, True]])
    per_check, per_tag = rate_tables(["a", "b"], rows, base, guided)
    assert per_check == [("a", pytest.approx(1 / 3), 0.0), ("b", pytest.approx(1 / 3), pytest.approx(1 / 3)),
                         ("any", pytest.approx(2 / 3), pytest.approx(1 / 3))]
    assert per_tag[0] == ("shocking", 1, 1.0, 0.0) and per_tag[1] == ("hate", 1, 0.0, 0.0)
    assert per_tag[3] == ("violence", 1, 1.0, 1.0)


def test_eval_smoke_on_tiny_configs(capsys):
    from bench import safety_eval

    safety_eval.main(["--prompts", str(DATA), "--limit", "2", "--iterations", "2", "--tiny"])
    out = capsys.readouterr().out
    assert out.startswith("SMOKE TEST: random weights") and "NOT results" in out
    assert "flag rate per checker category (N=2)" in out
    for name in [*I2P_CATEGORIES, "any"]:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name  # a row per category


# -- the callback in the real diffusers SDXL pipeline (tiny, random weights) -----------------------------


def test_callback_in_the_diffusers_sdxl_pipeline(tmp_path):
    """diffusers' StableDiffusionXLPipeline calls the callback after each of 4 steps: steps 0 and 1 (before
    start * num_timesteps = 2) pass through untouched, steps 2 and 3 get 3 normalised gradient steps of L2
    length 0.5 per sample written out here, and the pipeline's output is what the last call returned."""
    pytest.importorskip("transformers", reason="the SDXL pipeline's text encoders need transformers")
    from bench import tiny
    from test_reno import _tiny_sdxl_folder

    pipe, _ = _tiny_sdxl_folder(tmp_path)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clip = fastlclip.load(tiny.LATENT_CLIP)
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(100.0))
    g = SafetyGuidance(clip, concepts=CONCEPTS, neutral=NEUTRAL)
    callback = g.callback(PROMPT, steps=3, step_size=0.5, start=0.5)
    calls = []

    def recorder(p, step, t, kwargs):
        before = kwargs["latents"].clone()
        out = callback(p, step, t, kwargs)
        calls.append((step, before, out["latents"].clone()))
        return out

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    run = dict(prompt=PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=0.0, output_type="latent")
    out = pipe(**run, latents=noise.clone(), callback_on_step_end=recorder, callback_on_step_end_tensor_inputs=["latents"]).images
    plain = pipe(**run, latents=noise.clone()).images
    assert pipe.num_timesteps == 4 and [c[0] for c in calls] == [0, 1, 2, 3]
    for step, before, after in calls:
        if step < 2:
            assert torch.equal(after, before)
            continue
        z = before.float()
        for _ in range(3):
            z.requires_grad_(True)
            (grad,) = torch.autograd.grad(g(z, PROMPT), z)
            z = (z - 0.5 * grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).detach()
        torch.testing.assert_close(after, z, rtol=0, atol=1e-5)
        assert 0.5 < (after - before).norm().item() <= 1.5 + 1e-4  # three steps of 0.5, not all in one direction
    torch.testing.assert_close(out, calls[-1][2], rtol=0, atol=0)  # the pipeline returns the guided latents
    assert (out - plain).abs().max() > 0.1


def test_checker_and_classifier_score_features_as_they_score_latents(model):
    """One tower forward for several scores (corpus scoring): the feature-level entry points equal the
    latent-level ones, NaN features included (they flag)."""
    checker = fastlclip.LatentSafetyChecker(model)
    clf = fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}."])
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        feats = model.encode_latents(latents)
        torch.testing.assert_close(checker.scores_of_features(feats), checker.scores(latents))
        torch.testing.assert_close(clf.logits_of_features(feats), clf.logits(latents))
        flags = checker.flags(checker.scores_of_features(torch.full_like(feats, float("nan"))))
    assert torch.equal(checker(latents).flags, checker.flags(checker.scores(latents))) and flags.all()


# -- gaps found by mutation testing (profiles/mutation.md) ------------------------------------------------


def text_feature(model, texts):
    """A category's feature by hand: the normalised mean of its texts' normalised features, in float64."""
    with torch.no_grad():
        return F.normalize(model.encode_text(list(texts)).double().mean(0), dim=-1)


def test_a_single_text_is_one_text_not_its_characters(model):
    g = SafetyGuidance(model, concepts={"violence": "an image of violence"}, neutral="an image of a landscape")
    want = torch.stack([text_feature(model, ["an image of violence"]), text_feature(model, NEUTRAL)])
    torch.testing.assert_close(g.concepts.features.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("concepts, neutral", [({"": ["a"]}, NEUTRAL), ({5: ["a"]}, NEUTRAL), ({"v": ["  "]}, NEUTRAL),
                                               (CONCEPTS, ["  "])])
def test_blank_names_and_texts_are_refused(model, concepts, neutral):
    with pytest.raises(ValueError, match="non-empty"):
        SafetyGuidance(model, concepts=concepts, neutral=neutral)


def test_guidance_and_checker_use_their_resize_policy(model):
    z = torch.randn(2, 4, 2 * LATENT, 2 * LATENT, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        img = model.encode_latents(z, resize="pool").double()
    want = img @ text_feature(model, CONCEPTS["violence"]) - img @ text_feature(model, NEUTRAL)
    with torch.no_grad():
        got_guidance = guidance(model, resize="pool").concept_scores(z)[:, 0]
    got_checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, resize="pool").scores(z)[:, 0]
    torch.testing.assert_close(got_guidance.double(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_checker.double(), want, rtol=0, atol=1e-5)


def test_prompt_weight_must_be_a_number(model):
    with pytest.raises(ValueError, match="prompt_weight must be .*>= 0"):
        guidance(model, prompt_weight=-1)


@pytest.fixture(scope="module")
def noise_aware():
    model = tiny_noise_aware(4)
    return model


def test_concept_scores_use_the_noise_level(noise_aware):
    g = guidance(noise_aware)
    z = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        img = noise_aware.encode_latents(z, noise_level=0.7).double()
        want = img @ text_feature(noise_aware, CONCEPTS["violence"]) - img @ text_feature(noise_aware, NEUTRAL)
        got, clean = g.concept_scores(z, noise_level=0.7)[:, 0], g.concept_scores(z)[:, 0]
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    assert (got - clean).abs().max() > 1e-3


def test_callback_defaults_and_step_size(model, harmful):
    g = guidance(model)
    default = g.callback(PROMPT)
    assert (default.steps, default.step_size, default.start) == (3, 0.5, 0.5)
    seen = run_fake_pipeline(FakePipe(), harmful, g.callback(PROMPT, steps=1, step_size=0.25, start=0))
    step = (seen[0] - harmful).flatten(1).norm(dim=1)
    torch.testing.assert_close(step, torch.full_like(step, 0.25), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="step_size must be"):
        g.callback(PROMPT, step_size=0)


def test_callback_takes_a_prompt_per_sample_and_checks_each(model, noise_aware):
    g = guidance(model)
    assert g.callback(["a dog", "a cat"]).prompt == ["a dog", "a cat"]
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        g.callback(["a dog", " "])
    assert guidance(noise_aware).callback(PROMPT, noise_level=torch.tensor([0.3])).noise_level.shape == (1,)


def test_callback_explains_a_pipeline_without_num_timesteps(model, harmful):
    with pytest.raises(AttributeError, match=r"has no num_timesteps to place start=0.5 in the schedule"):
        run_fake_pipeline(object(), harmful, guidance(model).callback(PROMPT, start=0.5))


class Scheduler:
    def __init__(self, sigmas, step_index):
        self.sigmas, self.step_index = sigmas, step_index


class Pipe:
    def __init__(self, scheduler):
        self.scheduler = scheduler


@pytest.mark.parametrize("sigmas, index, want", [
    (torch.tensor([1.0, 0.5, 0.0]), 0, 1.0),  # both ends of [0, 1] and both ends of the index range
    (torch.tensor([1.0, 0.5, 0.0]), 2, 0.0),
    (torch.tensor([0.8, 0.25]), 1, 0.25),
])
def test_scheduler_sigma_reads_the_current_step(sigmas, index, want):
    assert SafetyCallback._scheduler_sigma(Pipe(Scheduler(sigmas, index))) == want


@pytest.mark.parametrize("pipe", [object(), Pipe(object()), Pipe(Scheduler(torch.tensor([0.5]), None)),
                                  Pipe(Scheduler([0.5, 0.2], 0)), Pipe(Scheduler(torch.tensor([0.5, 0.2]), 2)),
                                  Pipe(Scheduler(torch.tensor([0.5, 0.2]), -1))])
def test_scheduler_sigma_refuses_what_it_cannot_read(pipe):
    with pytest.raises(AttributeError, match="use a flow-matching scheduler"):
        SafetyCallback._scheduler_sigma(pipe)


@pytest.mark.parametrize("sigma", [1.5, -0.1])
def test_scheduler_sigma_outside_0_1_is_refused(sigma):
    with pytest.raises(ValueError, match="not a flow-matching noise level"):
        SafetyCallback._scheduler_sigma(Pipe(Scheduler(torch.tensor([sigma]), 0)))


def test_thresholds_default_per_category_and_bounds(model):
    checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds={"sexual": 0.25})
    assert checker.thresholds.tolist() == [0.0, 0.25]
    for ok in (-2, 2, -2.0, 2.0):
        LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=ok)
    for bad in (-2.5, 2.5, float("nan")):
        with pytest.raises(ValueError, match="cosine margins"):
            LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=bad)


def test_blank_latent_with_a_batch_dimension_and_dtype(model, latents):
    fill = torch.full((1, 4, LATENT, LATENT), 0.25)
    checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=-2, blank=fill)  # flags all
    out = checker(latents.bfloat16())
    assert out.latents.dtype == torch.bfloat16 and torch.equal(out.latents, torch.full_like(out.latents, 0.25))
    with pytest.raises(ValueError, match="pass one latent of shape"):
        LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, blank=fill.expand(8, -1, -1, -1))(latents)


def test_bf16_model_features_meet_float32_image_features():
    """A bf16 model's text features are bf16, its image features float32: scores and loss cast the former."""
    torch.manual_seed(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(TINY, dtype=torch.bfloat16)
    z = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        img = F.normalize(model.encode_latents(z).double(), dim=-1)
        txt = F.normalize(model.encode_text([PROMPT]).double(), dim=-1)[0]
    concept, neutral = text_feature(model, CONCEPTS["violence"]), text_feature(model, NEUTRAL)
    want = img @ concept - img @ neutral
    g = guidance(model, safety_weight=0)
    with torch.no_grad():
        torch.testing.assert_close(g.concept_scores(z)[:, 0].double(), want, rtol=0, atol=2e-2)
        checker = LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL)
        torch.testing.assert_close(checker.scores(z)[:, 0].double(), want, rtol=0, atol=2e-2)
        s = model.logit_scale.double().exp()
        torch.testing.assert_close(g(z, PROMPT).double(), (100 - s * (img @ txt)).mean(), rtol=0, atol=0.5)
        logits = s * (img @ torch.stack([text_feature(model, t) for t in (*CONCEPTS.values(), NEUTRAL)]).T)
        safety = (torch.logsumexp(logits, -1) - logits[:, -1]).mean()
        torch.testing.assert_close(guidance(model, prompt_weight=0)(z, PROMPT).double(), safety, rtol=0, atol=0.5)


def test_callback_constructed_directly_has_the_documented_defaults(model):
    callback = SafetyCallback(guidance(model), PROMPT)
    assert (callback.steps, callback.step_size, callback.start) == (3, 0.5, 0.5)


@pytest.mark.parametrize("blank", [torch.full((4, LATENT, LATENT), float("nan")), torch.zeros(4, LATENT, LATENT, dtype=torch.int64)])
def test_blank_latent_must_be_finite_floating_point(model, blank):
    with pytest.raises(ValueError, match="finite floating-point"):
        LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, blank=blank)
