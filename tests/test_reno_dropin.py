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


# -- the ensemble drop-in: ReNO's HPS / PickScore / CLIP / aesthetic losses as heads of one latent forward -------
ENSEMBLE_WEIGHTS = {"hps": 5.0, "pick": 0.05, "aes": 0.5}


class _LatentPipe:
    """ReNO's pipeline reduced to its shape for a tiny ensemble's 16-channel latents: ``apply(noise, prompt, ...)``
    maps the noise to latents (differentiably) and returns ``decode_latents_tensors(latents)``."""

    def __init__(self):
        self.decodes = 0

    @staticmethod
    def latents_of(noise):
        return torch.tanh(noise.float()) * 2

    def decode_latents_tensors(self, latents):
        self.decodes += 1
        return latents[:, :3].sigmoid()

    def apply(self, latents, prompt, generator=None, num_inference_steps=1):
        return self.decode_latents_tensors(self.latents_of(latents))


@pytest.fixture(scope="module")
def ensemble_file(tmp_path_factory):
    from fastlclip.ensemble import save_ensemble
    from test_serve_ensemble import tiny_ensemble

    return save_ensemble(tiny_ensemble(seed=3), tmp_path_factory.mktemp("ens") / "ensemble.safetensors")


def _independent(path, weights, latents, prompt=PROMPT):
    """ReNO's weighted loss from a RewardEnsemble on a freshly loaded copy of the file, called directly."""
    reward = fastlclip.RewardEnsemble(fastlclip.LatentEnsemble.load(path), weights=weights)
    return reward(latents, prompt)


def _ensemble_losses(path):
    from fastlclip.reno import LatentEnsembleLoss

    # ReNO's constructor calls, one per reward: Loss(weighting, dtype, device, cache_dir, ...)
    return [LatentEnsembleLoss(w, torch.float32, "cpu", None, pretrained=path, head=h) for h, w in ENSEMBLE_WEIGHTS.items()]


def test_ensemble_losses_are_reward_ensemble_heads_and_share_one_ensemble_and_one_hook(ensemble_file):
    losses = _ensemble_losses(ensemble_file)
    assert [(l.name, l.head, l.weighting, l.reads_latents) for l in losses] == \
        [("hps", "hps", 5.0, True), ("pick", "pick", 0.05, True), ("aes", "aes", 0.5, True)]
    assert all(l.ensemble is losses[0].ensemble for l in losses)  # one file, one RewardEnsemble
    pipe = _LatentPipe()
    original = pipe.decode_latents_tensors
    for l in losses:  # attaching each (or one) hooks the pipeline once for all
        assert l.attach(pipe) is pipe
    assert pipe.decode_latents_tensors._fastlclip_original == original
    z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    image = pipe.apply(z, PROMPT)
    assert pipe.decodes == 1 and not image.requires_grad
    latents = _LatentPipe.latents_of(z)
    for l in losses:
        got = l(image, PROMPT) * l.weighting  # as ReNO's trainer weights it
        want = _independent(ensemble_file, {l.head: l.weighting}, latents)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="once"):
        losses[0](image, PROMPT)


def test_renos_loop_over_three_heads_runs_the_trunk_once_per_iteration_and_moves_the_noise(ensemble_file):
    losses = _ensemble_losses(ensemble_file)
    pipe = losses[1].attach(_LatentPipe())
    calls = []
    trunk = losses[0].ensemble.model.trunk.visual.latent_vit
    hook = trunk.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        z0 = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(6))
        totals, zs, image = renos_train(pipe, losses, z0, iterations=4, lr=20.0)
    finally:
        hook.remove()
    assert calls == [1, 1, 1, 1] and pipe.decodes == 4  # three heads, one trunk forward per iteration
    assert (zs[3] - z0).abs().max() > 1e-3  # gradients reached the noise through the shared forward
    for total, z in zip(totals, zs):  # each iteration's total is the independent weighted ensemble loss
        want = _independent(ensemble_file, ENSEMBLE_WEIGHTS, _LatentPipe.latents_of(z)).item()
        assert total == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_gradients_flow_to_the_latents_with_a_full_decode(ensemble_file):
    from fastlclip.reno import LatentEnsembleLoss

    model = fastlclip.LatentEnsemble.load(ensemble_file)
    hps = LatentEnsembleLoss(1.0, head="hps", model=model)
    aes = LatentEnsembleLoss(1.0, head="aes", model=model)
    assert hps.ensemble is aes.ensemble  # one LatentEnsemble object, one RewardEnsemble
    pipe = aes.attach(_LatentPipe(), decode="full")
    z = nn.Parameter(torch.randn(1, 16, 8, 8))
    image = pipe.apply(z, PROMPT)
    assert image.requires_grad
    (hps(image, PROMPT) + aes(image, PROMPT)).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    reward = fastlclip.RewardEnsemble(model, {"hps": 1.0})  # a RewardEnsemble given is shared as it is
    assert LatentEnsembleLoss(2.0, head="pick", model=reward).ensemble is reward


def test_ensemble_loss_errors_are_clear(ensemble_file, tmp_path):
    from safetensors.torch import save_file

    from fastlclip.reno import LatentEnsembleLoss

    with pytest.raises(ValueError, match=r"unknown head 'imagereward'.*hps, pick, aes"):
        LatentEnsembleLoss(1.0, pretrained=ensemble_file, head="imagereward")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = fastlclip.load(TINY)
    path = tmp_path / "single.safetensors"
    save_file({k: v.contiguous() for k, v in single.state_dict().items()}, path)
    with pytest.raises(ValueError, match="not a fastlclip ensemble file.*LatentCLIPLoss"):
        LatentEnsembleLoss(1.0, pretrained=path, head="hps")
    with pytest.raises(FileNotFoundError, match="no ensemble file"):
        LatentEnsembleLoss(1.0, pretrained=tmp_path / "missing.safetensors", head="hps")
    with pytest.raises(TypeError, match="LatentEnsemble"):
        LatentEnsembleLoss(1.0, model=single, head="hps")
    with pytest.raises(ValueError, match="weighting"):
        LatentEnsembleLoss(-1.0, pretrained=ensemble_file, head="hps")
    loss = LatentEnsembleLoss(1.0, pretrained=ensemble_file, head="hps")
    with pytest.raises(RuntimeError, match="attach"):
        loss(None, PROMPT)
    with pytest.raises(ValueError, match="best"):
        loss.attach(_LatentPipe(), decode="best")
    with pytest.raises(TypeError, match="decode_latents_tensors"):
        loss.attach(object())


def test_ensemble_reward_losses_builds_renos_list_from_its_flags(ensemble_file):
    from fastlclip.reno import ensemble_reward_losses

    args = types.SimpleNamespace(enable_hps=True, hps_weighting=4.0, enable_imagereward=False, imagereward_weighting=1.0,
                                 enable_clip=False, clip_weighting=0.01, enable_pickscore=True,
                                 pickscore_weighting=0.05, enable_aesthetic=True, aesthetic_weighting=0.5)
    losses = ensemble_reward_losses(args, torch.float32, "cpu", None, pretrained=ensemble_file)
    assert [(l.name, l.head, l.weighting) for l in losses] == \
        [("HPS", "hps", 4.0), ("PickScore", "pick", 0.05), ("Aesthetic", "aes", 0.5)]  # ReNO's order and names
    assert all(l.ensemble is losses[0].ensemble for l in losses)
    # ReNO's defaults for what a dict lacks: ImageReward enabled, which no head can be
    with pytest.raises(ValueError, match="ImageReward.*disable_imagereward"):
        ensemble_reward_losses({}, pretrained=ensemble_file)
    with pytest.raises(ValueError, match=r"CLIP.*no head with reward preset 'clip'.*heads=\{'clip': HEAD\}"):
        ensemble_reward_losses({"enable_imagereward": False}, pretrained=ensemble_file)
    losses = ensemble_reward_losses({"enable_imagereward": False, "enable_pickscore": False}, pretrained=ensemble_file,
                                    heads={"clip": "pick"})
    assert [(l.name, l.head, l.weighting) for l in losses] == [("HPS", "hps", 5.0), ("CLIP", "pick", 0.01)]
    with pytest.raises(ValueError, match="unknown ReNO reward 'pick'"):
        ensemble_reward_losses({}, pretrained=ensemble_file, heads={"pick": "pick"})
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        ensemble_reward_losses({"enable_imagereward": False}, pretrained=ensemble_file, heads={"clip": "nope"})
