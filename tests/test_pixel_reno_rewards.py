"""The decode-then-reward baselines are ReNO's reward classes (issue 32, part 5).

``PixelCLIPReward(..., reward="clip" | "pickscore" | "hps")`` and ``PixelAestheticReward`` against ReNO's
``CLIPLoss``, ``PickScoreLoss``, ``HPSLoss`` and ``AestheticLoss`` written out by hand below from
ExplainableML/ReNO at bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb (rewards/base_reward.py, rewards/clip.py,
rewards/pickscore.py, rewards/hps.py, rewards/aesthetic.py, rewards/utils.py ``clip_img_transform``, and the decode
of models/RewardStableDiffusionXL.py ``decode_latents_tensors``), in float64, on tiny random models: the forward
values and the gradients to the latents, at ReNO's batch of 1 and at a batch of 3.
"""

import math

import pytest
import torch
from torch import nn
from torchvision import transforms as T

import fastlclip
from conftest import tiny_open_clip, tiny_vae
from fastlclip.rewards import AestheticMLP
from test_pixel_reward_fidelity import hf_clip, processor, tokenizer  # noqa: F401 (tokenizer: a fixture)

PROMPT = "A red dog and a green cat"
PROMPTS = ["A red dog and a green cat", "a bowl of soup", "an astronaut riding a horse"]


# -- ReNO, transcribed (float64 here; ReNO runs float16 on CUDA) ---------------------------------------------------

def reno_decode(vae, latents):
    """models/RewardStableDiffusionXL.py lines 80-83, ``decode_latents_tensors``."""
    latents = latents / vae.config.scaling_factor
    image = vae.decode(latents).sample
    return (image / 2 + 0.5).clamp(0, 1)


def reno_clip_img_transform(size=224):
    """rewards/utils.py lines 69-79 (torchvision >= 0.17 antialiases tensors by default: written out here)."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                      T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])


def _tensor(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object


class RenoBase:
    """rewards/base_reward.py lines 34-46."""

    def process_features(self, features):
        return features / features.norm(dim=-1, keepdim=True)

    def __call__(self, image, prompt):
        image_features = self.get_image_features(image)
        text_features = self.get_text_features(prompt)
        return self.compute_loss(self.process_features(image_features), self.process_features(text_features))


class RenoCLIPLoss(RenoBase):
    """rewards/clip.py lines 35-54."""

    def __init__(self, clip_model, tokenizer):
        self.clip_model, self.tokenizer = clip_model, tokenizer

    def get_image_features(self, image):
        return _tensor(self.clip_model.get_image_features(image))

    def get_text_features(self, prompt):
        prompt_token = self.tokenizer(prompt, return_tensors="pt", padding=True, max_length=77, truncation=True)
        return _tensor(self.clip_model.get_text_features(**prompt_token))

    def compute_loss(self, image_features, text_features):
        return 100 - (image_features @ text_features.T).mean() * self.clip_model.logit_scale.exp()


class RenoPickScoreLoss(RenoCLIPLoss):
    """rewards/pickscore.py lines 34-55 (features as CLIPLoss's)."""

    def compute_loss(self, image_features, text_features):
        return 30 - (self.clip_model.logit_scale.exp() * (image_features @ text_features.T)).mean()


class RenoHPSLoss(RenoBase):
    """rewards/hps.py lines 43-57 (open_clip; its tokenizer is open_clip's ``get_tokenizer("ViT-H-14")``)."""

    def __init__(self, hps_model):
        import open_clip

        self.hps_model, self.hps_tokenizer = hps_model, open_clip.tokenizer.tokenize

    def get_image_features(self, image):
        return self.hps_model.encode_image(image)

    def get_text_features(self, prompt):
        return self.hps_model.encode_text(self.hps_tokenizer(prompt))

    def compute_loss(self, image_features, text_features):
        logits_per_image = image_features @ text_features.T
        return 1 - torch.diagonal(logits_per_image)[0]


class RenoMLP(nn.Module):
    """rewards/aesthetic.py lines 79-101, ``MLP`` (a LightningModule there; its layers and forward)."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(nn.Linear(self.input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class RenoAestheticLoss(RenoBase):
    """rewards/aesthetic.py lines 46-76 (autocast and the float16 cast of line 73 left out: float64 here)."""

    def __init__(self, clip_model, mlp, transformers=False):
        self.clip_model, self.mlp, self.transformers = clip_model, mlp, transformers

    def get_image_features(self, image):
        if self.transformers:
            clip_img_features = _tensor(self.clip_model.get_image_features(image))
        else:
            clip_img_features = self.clip_model.encode_image(image)
        l2 = torch.norm(clip_img_features, p=2, dim=-1, keepdim=True)
        l2 = torch.where(l2 == 0, torch.tensor(1.0, device=clip_img_features.device, dtype=clip_img_features.dtype), l2)
        return clip_img_features / l2

    def __call__(self, image, prompt):
        image_features = self.get_image_features(image)
        image_features_normed = self.process_features(image_features)
        return 10.0 - self.mlp(image_features_normed).mean()


def reno_loss(reno, vae, latents, prompt, size):
    """training/trainer.py lines 100-102: the decoded image through ``clip_img_transform``, then the loss."""
    return reno(reno_clip_img_transform(size)(reno_decode(vae, latents)), prompt)


# -- models -------------------------------------------------------------------------------------------------------

def latents(batch, seed=2):
    return torch.randn(batch, 4, 6, 9, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # 48x72 px


def with_scale(model, scale):
    with torch.no_grad():
        model.logit_scale.fill_(math.log(scale))  # not the init value: the model's own scale must be the one used
    return model


def open_clip_768(seed=0):
    """A one-layer open_clip CLIP at 32 px with ViT-L/14's 768-d embedding: the width LAION's MLP reads."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=768, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}).eval()


def laion_state(input_size=768, seed=3):
    """A state dict with LAION's improved-aesthetic-predictor key names, from ReNO's MLP class."""
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in RenoMLP(input_size).state_dict().items()}


def compare(ours, reno, z, prompt, vae, size, atol=1e-10):
    """Forward values and gradients to the latents, ours and ReNO's, on copies of ``z``."""
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got, want = ours(z1, prompt), reno_loss(reno, vae, z2, prompt, size)
    assert got.dtype == torch.float64 and got.ndim == 0
    torch.testing.assert_close(got, want, rtol=0, atol=atol)
    got.backward()
    want.backward()
    assert z2.grad.abs().sum() > 0
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-7, atol=1e-12)


# -- the text-image rewards ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("reward", ["clip", "pickscore"])
def test_clip_and_pickscore_are_renos(tokenizer, reward, batch):  # noqa: F811
    vae, model = tiny_vae().double(), with_scale(hf_clip(), 37.0).double()
    ours = fastlclip.PixelCLIPReward(vae, model, processor=processor(tokenizer, 32), reward=reward)
    reno = (RenoCLIPLoss if reward == "clip" else RenoPickScoreLoss)(model, tokenizer)
    assert ours.name == ("pixel_clip" if reward == "clip" else "pixel_pickscore")
    compare(ours, reno, latents(batch), PROMPT, vae, 32)


@pytest.mark.parametrize("batch", [1, 3])
def test_hps_is_renos_at_batch_1_and_the_mean_of_renos_per_sample_losses(batch):
    vae, model = tiny_vae().double(), tiny_open_clip().double()
    ours = fastlclip.PixelCLIPReward(vae, model, reward="hps")
    assert ours.name == "pixel_hps"
    reno = RenoHPSLoss(model)
    z = latents(batch)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = ours(z1, PROMPT)
    per_sample = torch.stack([reno_loss(reno, vae, z2[i:i + 1], PROMPT, 32) for i in range(batch)])
    want = per_sample.mean()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    got.backward()
    want.backward()
    assert z2.grad[-1].abs().sum() > 0  # every sample gets a gradient (ReNO's [0] gives the others none)
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-7, atol=1e-12)
    with torch.no_grad():
        reno_batched = reno_loss(reno, vae, z, PROMPT, 32)  # 1 - diag(logits)[0]: the first sample only
    torch.testing.assert_close(reno_batched, per_sample[0].detach(), rtol=0, atol=1e-10)
    if batch == 1:
        torch.testing.assert_close(got.detach(), reno_batched, rtol=0, atol=1e-10)
    else:  # the documented difference: the mean, not the first sample
        assert abs(got.item() - reno_batched.item()) > 1e-6


def test_the_hps_definition_is_documented():
    doc = " ".join(fastlclip.PixelCLIPReward.__doc__.split())
    assert "1 - diag(logits)[0]" in doc and "batch mean" in doc and "rewards/hps.py" in doc


def test_one_prompt_per_latent_pairs_each_image_with_its_own(tokenizer):  # noqa: F811
    """ReNO has one prompt; with one per latent, the loss is the mean of ReNO's loss on each (image, prompt) pair."""
    vae, model = tiny_vae().double(), with_scale(hf_clip(), 37.0).double()
    ours = fastlclip.PixelCLIPReward(vae, model, processor=processor(tokenizer, 32), reward="pickscore")
    reno = RenoPickScoreLoss(model, tokenizer)
    z = latents(3)
    with torch.no_grad():
        want = torch.stack([reno_loss(reno, vae, z[i:i + 1], p, 32) for i, p in enumerate(PROMPTS)]).mean()
        torch.testing.assert_close(ours(z, PROMPTS), want, rtol=0, atol=1e-10)


def test_the_default_is_still_renos_clip_loss():
    vae, model = tiny_vae(), with_scale(tiny_open_clip(), 37.0)
    default = fastlclip.PixelCLIPReward(vae, model)
    assert (default.reward, default.name, default.reads_latents) == ("clip", "pixel_clip", False)
    z = latents(2).float()
    with torch.no_grad():
        torch.testing.assert_close(default(z, PROMPT), 100 - 37.0 * default.score(z, PROMPT).mean(), rtol=0, atol=1e-4)


# -- the aesthetic reward -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_aesthetic_is_renos(batch):
    vae, model = tiny_vae().double(), open_clip_768().double()
    state = laion_state()
    reno_mlp = RenoMLP(768).double().eval()
    reno_mlp.load_state_dict(state)
    ours = fastlclip.PixelAestheticReward(vae, model, state)
    assert (ours.name, ours.reads_latents, ours.weighting) == ("pixel_aesthetic", False, 1.0)
    compare(ours, RenoAestheticLoss(model, reno_mlp), latents(batch), PROMPT, vae, 32)


def test_aesthetic_with_a_transformers_clip_and_batched_scores(tokenizer):  # noqa: F811
    vae, model = tiny_vae().double(), hf_clip().double()  # 16-d embeddings
    state = laion_state(16)
    reno_mlp = RenoMLP(16).double().eval()
    reno_mlp.load_state_dict(state)
    ours = fastlclip.PixelAestheticReward(vae, model, state, processor=processor(tokenizer, 32), weighting=0.5)
    compare(ours, RenoAestheticLoss(model, reno_mlp, transformers=True), latents(3), None, vae, 32)
    z = latents(3)
    with torch.no_grad():
        torch.testing.assert_close(ours.score(z, batch_size=2), ours.score(z), rtol=0, atol=1e-12)
    from fastlclip import reno

    reno._check_reward(ours)  # usable in fastlclip.reno's loop (name, weighting, callable)


def test_the_mlp_loads_laions_state_dict_from_a_dict_a_module_or_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = laion_state()
    save_file(state, str(tmp_path / "aesthetic-model.safetensors"))
    module = RenoMLP(768)
    module.load_state_dict(state)
    for source in (state, module, tmp_path / "aesthetic-model.safetensors", str(tmp_path / "aesthetic-model.safetensors")):
        mlp = AestheticMLP.load(source)
        assert sorted(mlp.state_dict()) == sorted(state)
        for k, v in mlp.state_dict().items():
            assert torch.equal(v, state[k])
        assert [type(m).__name__ for m in mlp.layers] == [type(m).__name__ for m in module.layers]
        assert [m.p for m in mlp.layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    reward = fastlclip.PixelAestheticReward(tiny_vae(), open_clip_768(), module)
    assert reward.mlp is not module and not any(p.requires_grad for p in reward.mlp.parameters())
    assert all(p.requires_grad for p in module.parameters())  # the caller's module is copied, not frozen


# -- bad arguments ------------------------------------------------------------------------------------------------

def test_an_unknown_reward_name_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"reward must be one of 'clip', 'pickscore', 'hps'.*PixelAestheticReward"):
        fastlclip.PixelCLIPReward(tiny_vae(), tiny_open_clip(), reward="imagereward")
    with pytest.raises(ValueError, match="reward must be one of"):
        fastlclip.PixelCLIPReward(tiny_vae(), tiny_open_clip(), reward="CLIP")


def test_an_mlp_of_the_wrong_shape_is_refused():
    vae, model = tiny_vae(), open_clip_768()
    state = laion_state()
    with pytest.raises(ValueError, match=r"layers\.2\.weight has shape \(64, 1024\).*\(128, 1024\)"):
        fastlclip.PixelAestheticReward(vae, model, {**state, "layers.2.weight": torch.zeros(64, 1024)})
    missing = {k: v for k, v in state.items() if k != "layers.7.bias"}
    with pytest.raises(ValueError, match=r"LAION.*missing \['layers\.7\.bias'\]"):
        fastlclip.PixelAestheticReward(vae, model, missing)
    prefixed = {"module." + k: v for k, v in state.items()}
    with pytest.raises(ValueError, match="strip any 'module.'"):
        fastlclip.PixelAestheticReward(vae, model, prefixed)
    with pytest.raises(ValueError, match=r"reads 768-d image embeddings, the CLIP model gives 32-d.*ViT-L/14"):
        fastlclip.PixelAestheticReward(vae, tiny_open_clip(), state)  # a 32-d CLIP


def test_pickled_mlp_files_are_never_unpickled(tmp_path):
    path = tmp_path / "aesthetic-model.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"never unpickles.*weights_only=True"):
        fastlclip.PixelAestheticReward(tiny_vae(), open_clip_768(), path)
    with pytest.raises(TypeError, match="state dict must map names to tensors"):
        AestheticMLP.load(42)
