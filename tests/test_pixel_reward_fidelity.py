"""PixelCLIPReward is ReNO's CLIP reward (issue 22, section 4): torchvision's resize and crop, and transformers'
CLIPModel with its processor, checked against torchvision and against ReNO's ``CLIPLoss`` written out by hand
(ExplainableML/ReNO rewards/clip.py ``CLIPLoss``, rewards/base_reward.py ``BaseRewardLoss.__call__``, the
``Resize(size, BICUBIC)`` + ``CenterCrop(size)`` + OpenAI ``Normalize`` of rewards/utils.py)."""

import json

import pytest
import torch
from torchvision import transforms as T

import fastlclip
from conftest import tiny_open_clip, tiny_vae

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "A red dog and a green cat"


def clip_transform(size):
    """ReNO's CLIP image transform, from torchvision itself."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(size),
                      T.Normalize(OPENAI_MEAN, OPENAI_STD)])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A transformers CLIPTokenizer over open_clip's BPE vocabulary (the same ids as open_clip's tokenizer), offline."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    folder = tmp_path_factory.mktemp("tokenizer")
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def hf_clip(image_size=32, patch_size=8):
    """A tiny transformers CLIPModel, random weights."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": image_size, "patch_size": patch_size, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16)
    return CLIPModel(config).eval()


def processor(tokenizer, size):
    from transformers import CLIPImageProcessor, CLIPProcessor

    return CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size),
                         tokenizer=tokenizer)


@pytest.mark.parametrize("hw", [(48, 67), (67, 48), (40, 53), (56, 56), (48, 64), (33, 32)])
def test_resize_and_crop_are_torchvisions(hw):
    reward = fastlclip.PixelCLIPReward(tiny_vae(), tiny_open_clip())  # 32 px CLIP
    pixels = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(reward.preprocess(pixels), clip_transform(32)(pixels), rtol=0, atol=2e-5)


def test_the_long_side_is_floored_as_torchvision_does(tokenizer):
    """683 px by 512 px at 224: torchvision makes the long side int(224 * 683 / 512) = 298 px, not 299."""
    reward = fastlclip.PixelCLIPReward(tiny_vae(), hf_clip(224, 32), processor=processor(tokenizer, 224))
    pixels = torch.rand(1, 3, 512, 683, generator=torch.Generator().manual_seed(1))
    sizes = []
    original = torch.nn.functional.interpolate

    def spy(x, size=None, **kw):
        sizes.append(tuple(size))
        return original(x, size=size, **kw)

    torch.nn.functional.interpolate = spy
    try:
        got = reward.preprocess(pixels)
    finally:
        torch.nn.functional.interpolate = original
    assert sizes == [(224, 298)]
    torch.testing.assert_close(got, clip_transform(224)(pixels), rtol=0, atol=2e-5)


def reno_clip_loss(vae, model, tokenizer, latents, prompt, size):
    """ReNO's decode + CLIPLoss, by hand (fp32 here)."""
    image = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    image = clip_transform(size)(image)
    image_features = model.get_image_features(image)
    prompt_token = tokenizer(prompt, return_tensors="pt", padding=True, max_length=77, truncation=True)
    text_features = model.get_text_features(**prompt_token)
    if not isinstance(image_features, torch.Tensor):  # transformers 5 returns an output object
        image_features, text_features = image_features.pooler_output, text_features.pooler_output
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return 100 - model.logit_scale.exp() * torch.mean(torch.sum(image_features * text_features, dim=-1))


def test_transformers_clip_is_renos_clip_loss(tokenizer):
    vae, model = tiny_vae(), hf_clip()
    reward = fastlclip.PixelCLIPReward(vae, model, processor=processor(tokenizer, 32))
    z = torch.randn(2, 4, 6, 9, generator=torch.Generator().manual_seed(2))  # 48x72 px: non-square
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    got = reward(z1, PROMPT)
    want = reno_clip_loss(vae, model, tokenizer, z2, PROMPT, 32)
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-4)
    got.backward()
    want.backward()
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-3, atol=1e-6)


def test_transformers_clip_needs_its_tokenizer():
    with pytest.raises(ValueError, match="needs its tokenizer"):
        fastlclip.PixelCLIPReward(tiny_vae(), hf_clip())


def test_a_module_that_is_no_clip_is_refused():
    with pytest.raises(TypeError, match="open_clip CLIP or a transformers CLIPModel"):
        fastlclip.PixelCLIPReward(tiny_vae(), torch.nn.Linear(2, 2))
