"""The ReNO drop-in ``fastlclip.reno.LatentCLIPLoss``: ReNO's trainer loop (``LatentNoiseTrainer.train``, written
out below as in ExplainableML/ReNO, with ``RewardStableDiffusionXL`` reduced to what it calls) driven through the
drop-in on a tiny pipeline takes the same steps as the hand transcription of ReNO's update in
``test_reno_transcription`` scoring the latents directly; the decode runs outside autograd; and
``OneStepGenerator.from_pipeline`` / ``load(..., cache_dir=)``."""

import math
import types
import warnings

import pytest
import torch
from torch import nn

import fastlclip
from bench import reno_pipelines, tiny
from fastlclip.reno import SDXL_TURBO_SCHEDULER, LatentCLIPLoss, OneStepGenerator

from conftest import TINY
from test_reno_transcription import PROMPT, transcribed_reno

torchvision = pytest.importorskip("torchvision")


class TinyRewardSDXL:
    """ReNO's ``RewardStableDiffusionXL`` as its trainer uses it (``apply`` -> image, ``decode_latents_tensors``),
    on tiny random components; ``encode_prompt`` as diffusers' (4-tuple)."""

    def __init__(self):
        from diffusers import EulerAncestralDiscreteScheduler

        class Args:
            weights = None
        gen = reno_pipelines.build_generator(Args, device="cpu", dtype=torch.float32, smoke=True)
        self.unet, self.vae, self.text = gen.unet, gen.vae, gen.text_encoders
        self.text_encoder, self.text_encoder_2 = self.text.text_encoder, self.text.text_encoder_2
        self.scheduler = EulerAncestralDiscreteScheduler.from_config(SDXL_TURBO_SCHEDULER, timestep_spacing="trailing")
        self.side = tiny.IMAGE_SIZE
        self.vae_scale_factor = 8
        self.decodes = 0

    def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance):
        embeds, pooled = self.text.encode(prompt)
        return embeds, None, pooled, None

    def decode_latents_tensors(self, latents):
        self.decodes += 1
        image = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1)

    def apply(self, latents, prompt, generator=None, num_inference_steps=1):
        embeds, _, pooled, _ = self.encode_prompt(prompt, "cpu", 1, False)
        self.scheduler.set_timesteps(num_inference_steps)
        t = self.scheduler.timesteps[0]
        x = latents * self.scheduler.init_noise_sigma
        model_in = self.scheduler.scale_model_input(x, t).float()
        time_ids = torch.tensor([[self.side, self.side, 0, 0, self.side, self.side]], dtype=torch.float32)
        eps = self.unet(model_in, t, encoder_hidden_states=embeds,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        x = self.scheduler.step(eps, t, x, generator=generator).prev_sample
        return self.decode_latents_tensors(x)


def renos_train(pipe, reward_losses, z0, iterations, lr=5.0, keep_best=False):
    """``LatentNoiseTrainer.train`` with main.py's fp16 parameter and ``get_optimizer`` (SGD, Nesterov, 0.9):
    returns the reward losses, the noise before each iteration and the last image (``keep_best``: and ReNO's
    best image and every iteration's image)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize

    preprocess_fn = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                             Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    latents = nn.Parameter(z0.clone())
    optimizer = torch.optim.SGD([latents], lr=lr, momentum=0.9, nesterov=True)
    latent_dim = math.prod(latents.shape[1:])
    losses, zs, image, images, best_loss, best_image = [], [], None, [], math.inf, None
    for iteration in range(iterations):
        zs.append(latents.detach().clone())
        optimizer.zero_grad()
        generator = torch.Generator().manual_seed(0)
        image = pipe.apply(latents, PROMPT, generator=generator, num_inference_steps=1)
        total_loss = 0
        preprocessed_image = preprocess_fn(image)
        for reward_loss in reward_losses:
            loss = reward_loss(preprocessed_image, PROMPT)
            total_loss += loss * reward_loss.weighting
        losses.append(total_loss.item())
        images.append(image)
        if total_loss.item() < best_loss:
            best_loss, best_image = total_loss.item(), image
        latent_norm = torch.linalg.vector_norm(latents).to(torch.float32)
        total_loss += (0.01 * (0.5 * latent_norm**2 - (latent_dim - 1) * torch.log(latent_norm))).to(total_loss.dtype)
        if iteration != iterations - 1:
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(latents, 0.1)
            optimizer.step()
    return (losses, zs, best_image, images) if keep_best else (losses, zs, image)


@pytest.fixture(scope="module")
def latent_clip():
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastlclip.load(tiny.LATENT_CLIP)


def test_renos_update_through_the_drop_in(latent_clip):
    pipe = TinyRewardSDXL()
    loss = LatentCLIPLoss(0.5, torch.float32, "cpu", None, model=latent_clip, memsave=False)  # ReNO's constructor call
    assert loss.name == "LatentCLIP" and loss.weighting == 0.5 and loss.reads_latents
    loss.attach(pipe)
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).half()
    losses, zs, image = renos_train(pipe, [loss], z0, iterations=3)
    assert pipe.decodes == 3 and image.shape == (1, 3, 64, 64) and not image.requires_grad  # decoded, outside autograd

    generator = OneStepGenerator.from_pipeline(pipe, height=64, width=64)
    reward = fastlclip.LatentCLIPReward(latent_clip, 0.5)
    want_zs, want_losses, _ = transcribed_reno(generator, reward, z0, iterations=3)
    assert losses == pytest.approx(want_losses, rel=1e-4, abs=1e-3)
    assert (want_zs[2] - z0).abs().max() > 1e-2  # the noise moved
    for got, want in zip(zs, want_zs):
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)  # fp16 rounding


def test_full_decode_keeps_the_image_in_autograd_and_each_decode_is_scored_once(latent_clip):
    pipe = TinyRewardSDXL()
    loss = LatentCLIPLoss(1.0, torch.float32, "cpu", model=latent_clip)
    with pytest.raises(RuntimeError, match="attach"):
        loss(torch.zeros(1, 3, 224, 224), PROMPT)
    loss.attach(pipe, decode="full")
    z = nn.Parameter(torch.randn(1, 4, 8, 8))
    image = pipe.apply(z, PROMPT)
    assert image.requires_grad
    loss(image, PROMPT).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="once"):
        loss(image, PROMPT)
    with pytest.raises(ValueError, match="decode"):
        loss.attach(pipe, decode="skip")
    with pytest.raises(TypeError, match="apply"):
        loss.attach(type("DecodeOnly", (), {"decode_latents_tensors": lambda self, x: x})(), decode="best")
    with pytest.raises(TypeError, match="decode_latents_tensors"):
        loss.attach(object())


def test_decode_best_decodes_only_improvements_into_the_image_reno_keeps(latent_clip):
    pipe = TinyRewardSDXL()
    reference_decode = pipe.decode_latents_tensors
    loss = LatentCLIPLoss(1.0, torch.float32, "cpu", model=latent_clip)
    loss.attach(pipe, decode="best")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)).half()
    for run in range(2):  # a second run (a new noise parameter) starts its own best
        pipe.decodes = 0
        losses, zs, best_image, images = renos_train(pipe, [loss], z0, iterations=6, lr=500.0, keep_best=True)
        improvements = [i for i in range(6) if losses[i] < min(losses[:i], default=math.inf)]
        assert pipe.decodes == len(improvements) and 0 < len(improvements) < 6
        best = improvements[-1]
        generator = OneStepGenerator.from_pipeline(pipe, height=64, width=64)
        with torch.no_grad():
            want = reference_decode(generator(zs[best].float(), generator.encode_prompt(PROMPT)))
        torch.testing.assert_close(best_image.float(), want, rtol=0, atol=2e-3)  # fp16 noise: pipe and generator round apart
        assert all(not img.any() for i, img in enumerate(images) if i not in improvements)  # never decoded: black


def test_from_pipeline_needs_an_sdxl_pipeline():
    with pytest.raises(TypeError, match="unet"):
        OneStepGenerator.from_pipeline(object())


def test_load_cache_dir_reaches_the_hub_download(tmp_path, monkeypatch):
    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load(TINY)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    seen = {}

    def fake_download(repo, name, cache_dir=None, **kw):
        seen.update(repo=repo, name=name, cache_dir=cache_dir)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = fastlclip.load(TINY, "hf-hub:someone/tiny/w.safetensors", cache_dir=tmp_path / "hub")
    assert seen == {"repo": "someone/tiny", "name": "w.safetensors", "cache_dir": tmp_path / "hub"}
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale)


# -- gaps found by mutation testing ------------------------------------------------------------------------
def test_drop_in_loads_the_published_checkpoint_with_renos_arguments(latent_clip, monkeypatch):
    """Without ``model=``, ReNO's constructor call loads the published Latent-CLIP (B/8 at 512 px) through
    ``fastlclip.load`` with every argument passed on, and the reward keeps the weighting."""
    from fastlclip import factory

    seen = []

    def fake_load(*args, **kwargs):
        seen.append((args, kwargs))
        return latent_clip

    monkeypatch.setattr(factory, "load", fake_load)
    loss = LatentCLIPLoss(0.25, torch.float64, "meta", "/tmp/hub")  # ReNO's positional call
    assert seen == [(("Latent-ViT-B-8-512", "hf-hub:wendlerc/latent-clip-b-8-512-34b-80k"),
                     {"device": "meta", "dtype": torch.float64, "backend": "eager", "resize": None,
                      "cache_dir": "/tmp/hub"})]
    assert loss.reward.model is latent_clip and loss.reward.weighting == 0.25 and loss.weighting == 0.25
    seen.clear()
    LatentCLIPLoss(1.0, torch.float16, "cpu", model="Other", pretrained="w.safetensors", backend="graph",
                   resize="pool", name="mine")
    assert seen == [(("Other", "w.safetensors"), {"device": "cpu", "dtype": torch.float16, "backend": "graph",
                                                  "resize": "pool", "cache_dir": None})]


class _BarePipe:
    """The least of ReNO's pipeline ``decode="best"`` needs; ``apply`` records what reached it."""

    def __init__(self, **attrs):
        self.__dict__.update(attrs)
        self.calls = []

    def decode_latents_tensors(self, latents):
        return torch.ones(latents.shape[0], 3, 1, 1)

    def apply(self, latents, prompt, *args, **kwargs):
        self.calls.append((prompt, args, kwargs))
        return self.decode_latents_tensors(latents.float())


def test_decode_best_placeholder_has_the_pipelines_scale_and_dtype_and_apply_gets_every_argument(latent_clip):
    latents = torch.randn(2, 4, 6, 10, dtype=torch.float16)
    loss = LatentCLIPLoss(1.0, torch.float32, "cpu", model=latent_clip)
    pipe = loss.attach(_BarePipe(vae_scale_factor=4, unet=types.SimpleNamespace(dtype=torch.float16)), decode="best")
    image = pipe.apply(latents, PROMPT, "gen", 1, guidance=0.0)
    assert pipe.calls == [(PROMPT, ("gen", 1), {"guidance": 0.0})]
    assert image.shape == (2, 3, 24, 40) and image.dtype == torch.float16 and not image.any()  # the UNet's dtype
    pipe = LatentCLIPLoss(1.0, torch.float32, "cpu", model=latent_clip).attach(_BarePipe(), decode="best")
    image = pipe.apply(latents, PROMPT)
    assert image.shape == (2, 3, 48, 80) and image.dtype == torch.float32  # SDXL's 8; no UNet: the latents' dtype


def test_decode_best_with_zero_weighting_decodes_the_first_image_only_and_a_reattached_loss_works(latent_clip):
    """Weighting 0: ReNO's total is 0 every iteration, strictly lower than the best (inf) only at the first."""
    pipe = TinyRewardSDXL()
    reference_decode = pipe.decode_latents_tensors
    loss = LatentCLIPLoss(0.0, torch.float32, "cpu", model=latent_clip)
    loss.attach(pipe, decode="best")
    z0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)).half()
    losses, zs, best_image, images = renos_train(pipe, [loss], z0, iterations=3, keep_best=True)
    assert losses == [0.0, 0.0, 0.0] and pipe.decodes == 1
    generator = OneStepGenerator.from_pipeline(pipe, height=64, width=64)
    with torch.no_grad():
        want = reference_decode(generator(zs[0].float(), generator.encode_prompt(PROMPT)))
    torch.testing.assert_close(best_image.float(), want, rtol=0, atol=2e-3)
    bare = loss.attach(_BarePipe(), decode="no_grad")  # the same loss on another pipeline's plain decode afterwards
    bare.apply(z0.float(), PROMPT)
    assert torch.isfinite(loss(None, PROMPT))
