"""Issue 33 part 3: zero-shot classification, latent safety and corpus scoring on the 2025-26 latent spaces
(Qwen-Image, FLUX.2, SANA's DC-AE).

Every check states one thing: a consumer given what the pipeline hands (Qwen-Image's and FLUX.2's packed tokens,
their diffusion grid, SANA's grid) computes what the same consumer computes in VAE space on what the VAE decodes,
the latter made by the pipelines' own code as transcribed in tests/test_latent_spaces_2026.py (diffusers
58eb52c0803e: ``QwenImagePipeline._pack_latents`` / ``_unpack_latents`` and its decode input,
``Flux2Pipeline._pack_latents`` / ``_unpack_latents_with_ids`` / denormalise / ``_unpatchify_latents``, SANA's
``latents / scaling_factor``). fastlclip's ``LatentSpace`` builds no reference here.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import fastlclip
import tiny_spaces as ts
from corpus_shards import npy_bytes, pt_bytes, write_tar
from fastlclip import corpus
from fastlclip.corpus import __main__ as corpus_cli
from fastlclip.safety import SafetyCallback
from test_latent_spaces_2026 import (flux2_decode_input, flux2_pack_latents, flux2_prepare_latent_ids,
                                     flux2_unpack_latents_with_ids, qwen_decode_input, qwen_pack_latents,
                                     qwen_unpack_latents)

PROMPT = "a photo of a cat"
CLASSES = ["cat", "dog", "car"]
CONCEPTS = {"violence": ["an image of violence"], "animals": ["a photo of an animal", "a photo of a dog"]}
NEUTRAL = ["a photo of a landscape"]


@pytest.fixture(scope="module", params=ts.SPACES)
def world(request):
    name = request.param
    vae = ts.tiny_vae(name).double()
    return name, vae, ts.model(vae, name).double()


def layouts(name, vae, batch=3, side=16, width=None, seed=0, dtype=torch.float64):
    """``{"grid": the diffusion grid, "tokens": the pipeline's packed tokens (None for SANA), "raw": the VAE's decode
    input}`` for a ``side x width`` VAE latent (square by default), by the pipelines' own code."""
    width = width or side
    g = torch.Generator().manual_seed(seed)
    if name == "qwen-image":
        grid = torch.randn(batch, 16, side, width, generator=g, dtype=torch.float64)
        tokens = qwen_pack_latents(grid, batch, 16, side, width)
        # the tiny VAE's factor 2 is the pipeline's vae_scale_factor; its height / width are image pixels
        raw = qwen_decode_input(qwen_unpack_latents(tokens, side * 2, width * 2, 2), dict(vae.config))[:, :, 0]
        torch.testing.assert_close(qwen_unpack_latents(tokens, side * 2, width * 2, 2)[:, :, 0], grid, rtol=0, atol=0)
    elif name == "flux2":
        grid = torch.randn(batch, 32, side // 2, width // 2, generator=g, dtype=torch.float64)
        tokens = flux2_pack_latents(grid)
        raw = flux2_decode_input(tokens, flux2_prepare_latent_ids(grid), vae)
    else:
        grid = torch.randn(batch, 8, side, width, generator=g, dtype=torch.float64)
        tokens, raw = None, grid / vae.config.scaling_factor  # pipeline_sana.py
    cast = (lambda t: None if t is None else t.to(dtype))
    return {"grid": cast(grid), "tokens": cast(tokens), "raw": cast(raw)}


def handed(name, case):
    """What the pipeline hands its callbacks and ``output_type="latent"``: the tokens, SANA's grid."""
    return case["grid"] if case["tokens"] is None else case["tokens"]


def grid_from_tokens(name, tokens, side, width):
    """The pipeline's own unpacking of its tokens to the diffusion grid."""
    if name == "qwen-image":
        return qwen_unpack_latents(tokens, side * 2, width * 2, 2)[:, :, 0]
    ids = flux2_prepare_latent_ids(torch.empty(tokens.shape[0], 1, side // 2, width // 2))
    return flux2_unpack_latents_with_ids(tokens, ids)


# --- zero-shot ------------------------------------------------------------------------------------------------

def test_zero_shot_on_what_the_pipeline_hands_is_zero_shot_on_what_the_vae_decodes(world):
    name, vae, model = world
    clf = fastlclip.ZeroShotClassifier(model, CLASSES, ["a photo of a {}.", "a picture of a {}."], cache=False)
    case = layouts(name, vae)
    want = clf.logits(case["raw"], space="vae")
    for what in ("grid", "tokens"):
        if case[what] is None:
            continue
        torch.testing.assert_close(clf.logits(case[what]), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(clf.probs(case[what]), want.softmax(-1), rtol=1e-6, atol=1e-8)
        assert clf.predict(case[what]).tolist() == want.argmax(-1).tolist()
    # and the logits are the model's: logit_scale * cos(feature, class weights)
    feats = model.encode_latents(case["raw"], space="vae").float()
    torch.testing.assert_close(want, model.logit_scale.exp().float() * feats @ clf.weights.T)


@pytest.mark.parametrize("name", ["qwen-image", "flux2"])
def test_zero_shot_of_non_square_tokens_takes_their_height_and_width(name):
    vae = ts.tiny_vae(name).double()
    model = ts.model(vae, name).double()
    clf = fastlclip.ZeroShotClassifier(model, CLASSES, ["a photo of a {}."], cache=False)
    case = layouts(name, vae, side=16, width=8)
    want = clf.logits(case["raw"], space="vae", resize="interpolate")
    got = clf.logits(case["tokens"], height=16, width=8, resize="interpolate")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert clf.predict(case["tokens"], height=16, width=8, resize="interpolate").tolist() == want.argmax(-1).tolist()
    with pytest.raises(ValueError, match=f"'{name}'.*not a square grid"):
        clf.logits(case["tokens"], resize="interpolate")
    # the transposed reading (8 x 16) is another image: the height and width are not decoration
    other = clf.logits(case["tokens"], height=8, width=16, resize="interpolate")
    assert (other - want).abs().max() > 1e-4


@pytest.mark.parametrize("name, bad, match", [
    ("flux2", lambda: torch.randn(2, 8, 16, 16), r"'flux2'.*8 channels, expected 32"),  # VAE latents as diffusion
    ("qwen-image", lambda: torch.randn(2, 64, 48), r"'qwen-image'.*\(2, 64, 48\)"),
    ("sana", lambda: torch.randn(2, 16, 16, 16), r"16 channels, the model expects 8-channel latents of the 'sana' VAE"),
])
def test_zero_shot_and_safety_refuse_other_spaces_naming_theirs(name, bad, match):
    model = ts.model(ts.tiny_vae(name), name)
    clf = fastlclip.ZeroShotClassifier(model, CLASSES, ["a photo of a {}."], cache=False)
    checker = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL)
    guidance = fastlclip.SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL)
    for call in (lambda x: clf.predict(x), lambda x: checker(x), lambda x: guidance(x, PROMPT)):
        with pytest.raises(ValueError, match=match):
            call(bad())


# --- safety ---------------------------------------------------------------------------------------------------

def test_the_checker_on_what_the_pipeline_hands_is_the_checker_on_what_the_vae_decodes(world):
    name, vae, model = world
    diffusion = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL)
    reference = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, space="vae")
    case = layouts(name, vae)
    want = reference(case["raw"])
    for what in ("grid", "tokens"):
        if case[what] is None:
            continue
        got = diffusion(case[what])
        torch.testing.assert_close(got.scores, want.scores, rtol=1e-6, atol=1e-7)
        assert got.flags.tolist() == want.flags.tolist() and got.categories == want.categories
        assert got.latents is case[what]  # no blanking: the input as it came


@pytest.mark.parametrize("name", ["qwen-image", "flux2"])
def test_the_checker_blanks_tokens_with_a_grid_or_token_constant(name):
    vae = ts.tiny_vae(name).double()
    model = ts.model(vae, name).double()
    case = layouts(name, vae, batch=3)
    tokens, grid = case["tokens"], case["grid"]
    # a constant given as the diffusion grid (e.g. a black image's latent, space.to_diffusion) is packed as the
    # pipeline packs (its own _pack_latents), one given as tokens is used as it is
    fill_grid = torch.arange(grid[0].numel(), dtype=torch.float64).reshape(grid.shape[1:]) / 100
    packed = (qwen_pack_latents(fill_grid[None], 1, 16, 16, 16) if name == "qwen-image"
              else flux2_pack_latents(fill_grid[None]))[0]
    everything = {c: -2.0 for c in CONCEPTS}  # every sample flagged
    for blank in (fill_grid, fill_grid[None], packed, packed[None]):
        checker = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=everything,
                                                blank=blank)
        out = checker(tokens)
        assert out.blanked.all() and out.latents.shape == tokens.shape
        torch.testing.assert_close(out.latents, packed.expand_as(tokens), rtol=0, atol=0)
    # the grid keeps a grid constant; a wrong shape is refused naming both shapes
    checker = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=everything,
                                            blank=fill_grid)
    torch.testing.assert_close(checker(grid).latents, fill_grid.expand_as(grid), rtol=0, atol=0)
    bad = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, thresholds=everything,
                                        blank=torch.zeros(5, 7))
    with pytest.raises(ValueError, match=r"blank latent has shape \(5, 7\).*pass one latent of shape"):
        bad(tokens)


@pytest.mark.parametrize("name", ["qwen-image", "flux2"])
def test_non_square_tokens_are_checked_with_their_height_and_width(name):
    vae = ts.tiny_vae(name).double()
    model = ts.model(vae, name).double()
    case = layouts(name, vae, side=16, width=8)
    diffusion = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, resize="interpolate")
    reference = fastlclip.LatentSafetyChecker(model, concepts=CONCEPTS, neutral=NEUTRAL, space="vae",
                                              resize="interpolate")
    want = reference.scores(case["raw"])
    torch.testing.assert_close(diffusion.scores(case["tokens"], height=16, width=8), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(diffusion(case["tokens"], height=16, width=8).scores, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not a square grid"):
        diffusion(case["tokens"])


def test_guidance_loss_and_gradient_through_the_pipelines_own_conversion(world):
    name, vae, model = world
    guidance = fastlclip.SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, prompt_weight=0.5)
    reference = fastlclip.SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, prompt_weight=0.5, space="vae")
    case = layouts(name, vae)
    x = handed(name, case).clone().requires_grad_(True)
    loss = guidance(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    x2 = handed(name, case).clone().requires_grad_(True)
    raw = to_raw(name, vae, x2, 16, 16)
    ref_loss = reference(raw, PROMPT)
    (ref_grad,) = torch.autograd.grad(ref_loss, x2)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-9)
    assert grad.shape == x.shape and grad.abs().max() > 0
    torch.testing.assert_close(guidance.concept_scores(handed(name, case)), reference.concept_scores(case["raw"]))


def to_raw(name, vae, x, side, width):
    """The VAE's decode input for what the pipeline hands, by the pipeline's own code (differentiable)."""
    if name == "qwen-image":
        return qwen_decode_input(qwen_unpack_latents(x, side * 2, width * 2, 2), dict(vae.config))[:, :, 0]
    if name == "flux2":
        ids = flux2_prepare_latent_ids(torch.empty(x.shape[0], 1, side // 2, width // 2))
        return flux2_decode_input(x, ids, vae)
    return x / vae.config.scaling_factor


class _Scheduler:
    def __init__(self):
        self.sigmas, self.step_index = torch.linspace(1, 0, 5), 0


@pytest.mark.parametrize("name, side, width", [("qwen-image", 16, 8), ("flux2", 16, 16), ("flux2", 8, 16),
                                               ("sana", 16, 16)])
def test_the_callback_nudges_what_the_pipeline_hands(name, side, width):
    """callback_on_step_end gets the pipeline's latents (tokens for Qwen-Image and FLUX.2: they keep no height or
    width, so a non-square image's are passed); each step is the normalised gradient step on those latents."""
    vae = ts.tiny_vae(name).double()
    model = ts.model(vae, name).double()
    guidance = fastlclip.SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, resize="interpolate")
    reference = fastlclip.SafetyGuidance(model, concepts=CONCEPTS, neutral=NEUTRAL, space="vae", resize="interpolate")
    case = layouts(name, vae, batch=2, side=side, width=width)
    latents = handed(name, case)
    kw = {} if side == width else {"height": side, "width": width}
    callback = guidance.callback(PROMPT, steps=2, step_size=0.25, start=0.0, **kw)
    assert isinstance(callback, SafetyCallback)
    with torch.no_grad():
        got = callback(object(), 0, None, {"latents": latents.clone()})["latents"]
    z = latents.clone()
    for _ in range(2):
        z.requires_grad_(True)
        (g,) = torch.autograd.grad(reference(to_raw(name, vae, z, side, width), PROMPT), z)
        z = (z - 0.25 * g / torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, *[1] * (g.ndim - 1))).detach()
    assert got.shape == latents.shape and got.dtype == latents.dtype
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-8)
    assert (got - latents).abs().max() > 1e-3


def test_the_callback_checks_the_latent_size_and_reads_the_scheduler():
    vae = ts.tiny_vae("qwen-image")
    guidance = fastlclip.SafetyGuidance(ts.model(vae, "qwen-image"), concepts=CONCEPTS, neutral=NEUTRAL,
                                        resize="interpolate")
    for kw, what in (({"height": 16}, "width must be"), ({"height": 0, "width": 8}, "height must be"),
                     ({"height": 16, "width": 8.0}, "width must be"), ({"height": True, "width": 8}, "height must")):
        with pytest.raises(ValueError, match=what):
            guidance.callback(PROMPT, **kw)
    tokens = layouts("qwen-image", vae, batch=1, side=16, width=8, dtype=torch.float32)["tokens"]
    with pytest.raises(ValueError, match="not a square grid"):
        guidance.callback(PROMPT, start=0.0)(object(), 0, None, {"latents": tokens})
    # noise-aware on tokens: the scheduler's sigma, as for the grid spaces
    aware = ts.model(vae, "qwen-image", noise_aware=True)
    with torch.no_grad():  # a trained-looking noise embedding, so the level read matters
        g = torch.Generator().manual_seed(3)
        for p in aware.visual.latent_vit.noise_embed.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    g = fastlclip.SafetyGuidance(aware, concepts=CONCEPTS, neutral=NEUTRAL, resize="interpolate")
    pipe = type("Pipe", (), {"scheduler": _Scheduler()})()
    pipe.scheduler.step_index = 2
    sched = g.callback(PROMPT, steps=1, start=0.0, noise_level="scheduler", height=16, width=8)
    fixed = g.callback(PROMPT, steps=1, start=0.0, noise_level=float(pipe.scheduler.sigmas[2]), height=16, width=8)
    got = sched(pipe, 2, None, {"latents": tokens.clone()})["latents"]
    torch.testing.assert_close(got, fixed(pipe, 2, None, {"latents": tokens.clone()})["latents"])
    clean = g.callback(PROMPT, steps=1, start=0.0, height=16, width=8)(pipe, 2, None, {"latents": tokens.clone()})
    assert (got - clean["latents"]).abs().max() > 1e-6


# --- corpus scoring -------------------------------------------------------------------------------------------

def read(out, stem) -> dict:
    return pq.read_table(os.path.join(out, f"{stem}.parquet")).to_pydict()


def reference_columns(model, raw, prompts, classes):
    """The corpus columns by the consumers themselves, in VAE space on the VAE's decode input."""
    with torch.no_grad():
        feats = model.encode_latents(raw, space="vae")
        cos = (feats @ model.encode_text(prompts).T).numpy()
        probs = fastlclip.ZeroShotClassifier(model, classes, ["a photo of a {}."], cache=False).probs(
            raw, space="vae").numpy()
        check = fastlclip.LatentSafetyChecker(model, space="vae")(raw)
    return feats.numpy(), cos, probs, check


def check_columns(got, model, raw, prompts=(PROMPT,), classes=CLASSES, atol=1e-5):
    feats, cos, probs, check = reference_columns(model, raw, list(prompts), classes)
    for i in range(len(prompts)):
        np.testing.assert_allclose(got[f"clip_cos_{i}"], cos[:, i], atol=atol)
    for j, c in enumerate(classes):
        np.testing.assert_allclose(got[f"prob_{c}"], probs[:, j], atol=atol)
    assert got["label"] == [classes[j] for j in probs.argmax(1)]
    for j, c in enumerate(check.categories):
        np.testing.assert_allclose(got[f"safety_{c}"], check.scores[:, j].numpy(), atol=atol)
    assert got["safety_flag"] == check.flagged.tolist()
    np.testing.assert_allclose(np.array(got["embedding"], dtype=np.float32), feats, atol=2e-3)


def test_corpus_scores_what_the_pipelines_hand_as_the_consumers_do(tmp_path, world):
    """Shards of tokens (.pt, as ``output_type="latent"`` hands them), of the grid (.npy with a batch axis) and
    of nested Parquet lists, scored in diffusion space, batches mixing layouts: every column equals the consumer's
    own on the VAE's decode input."""
    name, vae, model = world
    case = layouts(name, vae, batch=5, dtype=torch.float32)
    first = handed(name, case)
    write_tar(tmp_path / "a.tar", [(f"a{i:04d}", {"latent.pt": pt_bytes(first[i].clone())}) for i in range(3)]
              + [(f"a{i:04d}", {"latent.npy": npy_bytes(case["grid"][i:i + 1].numpy())}) for i in range(3, 5)])
    pq.write_table(pa.table({"key": [f"c{i}" for i in range(5)], "latent": pa.array(first.tolist())}),
                   tmp_path / "c.parquet")
    out = tmp_path / "out"
    # the float64 model is copied to the corpus' float32 (the caller's model stays as it is)
    report = corpus.score([tmp_path / "a.tar", tmp_path / "c.parquet"], out, model=model, prompts=[PROMPT],
                          classes=CLASSES, safety=True, embeddings=True, space="diffusion", batch_size=2,
                          progress=False)
    assert model.dtype == torch.float64
    assert [r["status"] for r in report.records] == ["ok", "ok"] and report.rows == 10 and not report.bad_samples
    raw = case["raw"].double()
    check_columns(read(out, "a"), model, raw)
    check_columns(read(out, "c"), model, raw)
    # VAE space reads the decode input itself
    write_tar(tmp_path / "v.tar", [(f"v{i}", {"latent.pt": pt_bytes(case["raw"][i].clone())}) for i in range(5)])
    corpus.score([tmp_path / "v.tar"], tmp_path / "vae", model=model, prompts=[PROMPT], classes=CLASSES, safety=True,
                 embeddings=True, progress=False)
    check_columns(read(tmp_path / "vae", "v"), model, raw)


@pytest.mark.parametrize("name", ["qwen-image", "flux2"])
def test_corpus_refuses_what_it_cannot_read_unambiguously(tmp_path, name):
    """Flat storage of a packed space's diffusion latents (tokens or grid: the order is unknown) and a wrong token
    count are bad samples naming the shapes the model takes; the rest of the shard is scored."""
    vae = ts.tiny_vae(name)
    model = ts.model(vae, name)
    case = layouts(name, vae, batch=3, dtype=torch.float32)
    tokens = case["tokens"]
    flat = tokens.reshape(3, -1).tolist()
    pq.write_table(pa.table({"key": ["f0", "f1"], "latent": pa.array(flat[:2])}), tmp_path / "flat.parquet")
    short = tokens[0, :-4].clone()
    write_tar(tmp_path / "t.tar", [("t0", {"latent.pt": pt_bytes(tokens[0].clone())}),
                                   ("t1", {"latent.pt": pt_bytes(short)}),
                                   ("t2", {"latent.pt": pt_bytes(tokens[1:2].clone())})])
    report = corpus.score([tmp_path / "flat.parquet", tmp_path / "t.tar"], tmp_path / "out", model=model,
                          prompts=[PROMPT], space="diffusion", progress=False)
    bad = {b["key"]: b["error"] for b in report.bad_samples}
    grid, tok = tuple(case["grid"].shape[1:]), tuple(tokens.shape[1:])
    assert set(bad) == {"f0", "f1", "t1"}
    assert "flat storage does not say which" in bad["f0"] and str(grid) in bad["f0"] and str(tok) in bad["f0"]
    assert bad["t1"] == f"shape {tuple(short.shape)}, the model takes {grid} or its packed tokens {tok}"
    assert read(tmp_path / "out", "t")["key"] == ["t0", "t2"]
    # in VAE space the flat storage has one reading, (C, H, W)
    raw = case["raw"]
    pq.write_table(pa.table({"key": ["r0", "r1", "r2"], "latent": pa.array(raw.reshape(3, -1).tolist())}),
                   tmp_path / "r.parquet")
    report = corpus.score([tmp_path / "r.parquet"], tmp_path / "vae", model=model, prompts=[PROMPT], progress=False)
    assert report.rows == 3 and not report.bad_samples
    with torch.no_grad():
        want = (model.encode_latents(raw, space="vae") @ model.encode_text([PROMPT]).T)[:, 0].numpy()
    np.testing.assert_allclose(read(tmp_path / "vae", "r")["clip_cos_0"], want, atol=1e-5)


def test_corpus_check_sample_unpacks_tokens_exactly():
    from fastlclip.corpus.readers import Sample
    from fastlclip.corpus.runner import BadSample, check_sample
    from fastlclip.corpus.scoring import latent_layout

    vae = ts.tiny_vae("flux2")
    model = ts.model(vae, "flux2")
    shape, tokens = latent_layout(model, "diffusion")
    assert shape == (32, 8, 8) and tokens[0] == (64, 32)
    assert latent_layout(model, "vae") == ((8, 16, 16), None)
    assert latent_layout(ts.model(ts.tiny_vae("sana"), "sana"), "diffusion") == ((8, 16, 16), None)
    case = layouts("flux2", vae, batch=1)
    got = check_sample(Sample("k", case["tokens"][0]), shape, tokens=tokens)
    assert got.dtype == torch.float64 and torch.equal(got, case["grid"][0])  # bit for bit, the stored dtype
    half = check_sample(Sample("k", case["tokens"]), shape, torch.float16, tokens=tokens)
    assert half.dtype == torch.float16 and torch.equal(half, case["grid"][0].half())
    assert torch.equal(check_sample(Sample("k", case["grid"][0]), shape, tokens=tokens), case["grid"][0])
    with pytest.raises(BadSample, match="NaN or Inf"):
        check_sample(Sample("k", torch.full((64, 32), float("nan"))), shape, tokens=tokens)
    with pytest.raises(BadSample, match=r"shape \(2, 64, 32\)"):
        check_sample(Sample("k", torch.zeros(2, 64, 32)), shape, tokens=tokens)
    with pytest.raises(BadSample, match="latents must be floating point"):
        check_sample(Sample("k", torch.zeros(64, 32, dtype=torch.int64)), shape, tokens=tokens)


def test_corpus_flux2_without_its_statistics_scores_vae_latents_only(tmp_path, capsys):
    """A FLUX.2 model config without vae_stats: diffusion space is refused before any output is written (the
    statistics live in the VAE's weights); VAE space works. The command line says so in one line, exit 2."""
    vae = ts.tiny_vae("flux2")
    cfg = ts.model_config(vae, "flux2")
    cfg.pop("vae_stats")
    path = tmp_path / "flux2.json"
    path.write_text(json.dumps(cfg))
    raw = layouts("flux2", vae, batch=2, dtype=torch.float32)["raw"]
    write_tar(tmp_path / "s.tar", [(f"s{i}", {"latent.pt": pt_bytes(raw[i].clone())}) for i in range(2)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="live in the VAE's weights"):
            corpus.score([tmp_path / "s.tar"], tmp_path / "out", model=str(path), prompts=[PROMPT], space="diffusion",
                         progress=False)
        assert not (tmp_path / "out").exists()
        code = corpus_cli.main(["score", str(tmp_path / "s.tar"), "--out", str(tmp_path / "cli"), "--model", str(path),
                                "--prompts", PROMPT, "--space", "diffusion"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "live in the VAE's weights" in err[0]
        assert corpus.score([tmp_path / "s.tar"], tmp_path / "vae", model=str(path), prompts=[PROMPT],
                            progress=False).rows == 2


def test_corpus_command_line_scores_qwen_image_tokens(tmp_path, capsys):
    """``python -m fastlclip.corpus score --space diffusion`` on Qwen-Image tokens, from a config JSON (random
    weights, seeded as every worker seeds them)."""
    vae = ts.tiny_vae("qwen-image")
    path = tmp_path / "qwen.json"
    path.write_text(json.dumps(ts.model_config(vae, "qwen-image")))
    case = layouts("qwen-image", vae, batch=4, dtype=torch.float32)
    write_tar(tmp_path / "q.tar", [(f"q{i}", {"latent.pt": pt_bytes(case["tokens"][i].clone())}) for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        code = corpus_cli.main(["score", str(tmp_path / "q.tar"), "--out", str(tmp_path / "out"), "--model",
                                str(path), "--prompts", PROMPT, "--classes", *CLASSES, "--safety", "--embeddings",
                                "--space", "diffusion", "--batch-size", "3"])
        assert code == 0, capsys.readouterr().err
        torch.manual_seed(0)
        model = fastlclip.load(str(path)).double()
    check_columns(read(tmp_path / "out", "q"), model, case["raw"].double())
