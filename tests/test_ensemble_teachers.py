"""Teachers of a reward ensemble (issue 32, parts 1 and 2): the three kinds built from tiny configs (no downloads),
each one's preprocessing read from its own config, every reward against ReNO's code written out here, and
multi-teacher targets: one decode per sample, a column per teacher, the teacher set in the run identity, prompts
kept from the shards.

ReNO's rewards are transcribed from ExplainableML/ReNO at bd6f6ac: rewards/base_reward.py
(``BaseRewardLoss.process_features``, ``__call__``), rewards/hps.py, rewards/pickscore.py, rewards/clip.py
(``compute_loss``) and rewards/aesthetic.py (``AestheticLoss.__call__``, ``MLP``); flow_grpo's PickScore from
yifan123/flow_grpo at ac4c86e, flow_grpo/pickscore_scorer.py (``PickScoreScorer.__call__``)."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from conftest import tiny_open_clip
from distill_world import TEACHER_CFG, images, make_vae, write_shards
from fastlclip.distill import make_targets, read_targets, teachers as tt

OC_PRE = {"size": [32, 32], "mean": [0.5, 0.45, 0.4], "std": [0.2, 0.25, 0.3], "interpolation": "bicubic",
          "resize_mode": "shortest"}
HF_MEAN, HF_STD = [0.1, 0.2, 0.3], [0.9, 0.8, 0.7]


# -- tiny teachers -----------------------------------------------------------------------------------
def clip_tokenizer(folder):
    """A transformers CLIPTokenizer over open_clip's BPE vocabulary, offline (as tests/test_pixel_reward_fidelity.py)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def hf_clip(image_size=24, seed=1):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"image_size": image_size, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16, logit_scale_init_value=math.log(50.0))
    return CLIPModel(config).eval()


def hf_processor(tokenizer):
    from transformers import CLIPImageProcessor, CLIPProcessor

    return CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=24, resample=2,
                                                            image_mean=HF_MEAN, image_std=HF_STD),
                         tokenizer=tokenizer)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Teachers as files: an open_clip config (open_clip_config.json form, with its preprocess_cfg) and a weights
    file; a transformers model folder and a processor folder (as PickScore's, apart); an aesthetic MLP's state dict."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("teachers")
    oc = tiny_open_clip(3)
    (d / "oc.json").write_text(json.dumps({"model_cfg": TEACHER_CFG, "preprocess_cfg": OC_PRE}))
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(d / "oc.safetensors"))
    model = hf_clip()
    model.save_pretrained(d / "hf_model")
    (d / "tok").mkdir()
    hf_processor(clip_tokenizer(d / "tok")).save_pretrained(d / "hf_processor")
    torch.manual_seed(4)
    mlp = tt.AestheticMLP((32, 16, 8, 8, 4, 1))
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(d / "aesthetic.safetensors"))
    return {"dir": d, "oc": oc, "hf": model, "mlp": mlp}


def specs(files, reward_oc="hps", reward_hf="pickscore", scale_hf=1.0):
    d = files["dir"]
    return [tt.TeacherSpec("hps", "open_clip", model="tiny-ens-oc", config=str(d / "oc.json"),
                           weights=str(d / "oc.safetensors"), reward=reward_oc),
            tt.TeacherSpec("pick", "hf", model=str(d / "hf_model"), processor=str(d / "hf_processor"),
                           reward=reward_hf, scale=scale_hf),
            tt.TeacherSpec("aes", "aesthetic", base="hps", weights=str(d / "aesthetic.safetensors"))]


@pytest.fixture(scope="module")
def built(files):
    return tt.build_teachers(specs(files))


# -- part 1: teachers --------------------------------------------------------------------------------
def test_each_teacher_reads_its_own_preprocessing(built):
    oc, hf, aes = built["hps"].preprocess, built["pick"].preprocess, built["aes"].preprocess
    assert (oc.resize, oc.crop, oc.mean, oc.std, oc.interpolation) == (32, 32, (0.5, 0.45, 0.4), (0.2, 0.25, 0.3), "bicubic")
    assert (hf.resize, hf.crop, hf.interpolation) == (28, 24, "bilinear")
    assert np.allclose(hf.mean, HF_MEAN) and np.allclose(hf.std, HF_STD)  # rescale_factor 1/255 folds to 1
    assert aes == oc  # a head sees its base's input
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 40, 56, generator=g)
    for pre, inter in ((oc, T.InterpolationMode.BICUBIC), (hf, T.InterpolationMode.BILINEAR)):
        want = T.Compose([T.Resize(pre.resize, interpolation=inter, antialias=True), T.CenterCrop(pre.crop),
                          T.Normalize(pre.mean, pre.std)])(pixels)
        torch.testing.assert_close(pre(pixels), want, atol=1e-5, rtol=1e-5)


def test_teachers_embed_with_their_own_towers(built, files):
    from transformers import CLIPImageProcessor

    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    oc, hf = built["hps"], built["pick"]
    assert (oc.embed_dim, hf.embed_dim, built["aes"].embed_dim) == (32, 16, 32)
    want = F.normalize(files["oc"].encode_image(T.Normalize(OC_PRE["mean"], OC_PRE["std"])(pixels)), dim=-1)
    torch.testing.assert_close(oc.embed_images(pixels), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(built["aes"].embed_images(pixels), oc.embed_images(pixels))
    # the transformers teacher against its own processor on the same pixels (no resize: the crop is the input size)
    pixels24 = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(2))
    proc = CLIPImageProcessor(do_resize=False, crop_size=24, image_mean=HF_MEAN, image_std=HF_STD, do_rescale=False)
    x = torch.as_tensor(np.stack(proc(list(pixels24.numpy()), return_tensors="np", input_data_format="channels_first")
                                 ["pixel_values"]))
    from fastlclip.rewards import _features

    want = F.normalize(_features(files["hf"].get_image_features(pixel_values=x)), dim=-1)
    got = tt.HFCLIPTeacher("h", files["hf"], proc).embed_images(pixels24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    txt = hf.embed_texts(["a red dog", "a cat"])
    assert txt.shape == (2, 16) and torch.allclose(txt.norm(dim=-1), torch.ones(2))
    assert oc.embed_texts(["a red dog"]).shape == (1, 32)
    with pytest.raises(ValueError, match="no text tower"):
        built["aes"].embed_texts(["x"])


# ReNO, written out (see the module docstring): features -> process_features -> compute_loss
def reno_process_features(f):
    return f / f.norm(dim=-1, keepdim=True)


def reno_hps_loss(img, txt):
    logits_per_image = img @ txt.T
    return 1 - torch.diagonal(logits_per_image)[0]


def reno_pickscore_loss(img, txt, logit_scale):
    return 30 - (logit_scale.exp() * (img @ txt.T)).mean()


def reno_clip_loss(img, txt, logit_scale):
    return 100 - (img @ txt.T).mean() * logit_scale.exp()


def reno_aesthetic_loss(img, mlp):
    """ReNO never calls ``self.mlp.eval()``, so its dropouts are live there: fastlclip (as flow_grpo's
    ``AestheticScorer``, which calls ``self.eval()``) evaluates the MLP in eval mode, the deterministic value."""
    return 10.0 - mlp.eval()(reno_process_features(img)).mean()


def test_rewards_are_renos_losses(built, files):
    from fastlclip.rewards import _features

    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompt = ["a red dog and a green cat"]
    oc, hf, aes = built["hps"], built["pick"], built["aes"]
    # open_clip HPS: raw features from the model, ReNO normalises them
    raw_i = files["oc"].encode_image(oc.preprocess(pixels))
    raw_t = files["oc"].encode_text(oc.tokenizer(prompt))
    want = reno_hps_loss(reno_process_features(raw_i), reno_process_features(raw_t))
    torch.testing.assert_close(oc.reward(oc.embed_images(pixels), oc.embed_texts(prompt))[0], want)
    # transformers PickScore, and the same model under ReNO's CLIP constant
    x = hf.preprocess(pixels)
    raw_i = _features(files["hf"].get_image_features(pixel_values=x))
    tok = hf.tokenizer(prompt, return_tensors="pt", padding=True, max_length=77, truncation=True)
    raw_t = _features(files["hf"].get_text_features(**tok))
    i_n, t_n = reno_process_features(raw_i), reno_process_features(raw_t)
    i_e, t_e = hf.embed_images(pixels), hf.embed_texts(prompt)
    torch.testing.assert_close(hf.reward(i_e, t_e)[0], reno_pickscore_loss(i_n, t_n, files["hf"].logit_scale))
    as_clip = tt.HFCLIPTeacher("c", files["hf"], hf.processor, reward="clip")
    torch.testing.assert_close(as_clip.reward(i_e, t_e)[0], reno_clip_loss(i_n, t_n, files["hf"].logit_scale))
    assert hf.score(i_e, t_e)[0].item() == pytest.approx(50.0 * (i_n @ t_n.T).item(), rel=1e-4)
    # aesthetic: 10 - MLP(normalised embedding of its base)
    raw = files["oc"].encode_image(oc.preprocess(pixels))
    torch.testing.assert_close(aes.reward(aes.embed_images(pixels))[0], reno_aesthetic_loss(raw, files["mlp"]))
    assert aes.score(aes.embed_images(pixels))[0].item() == pytest.approx(10 - aes.reward(aes.embed_images(pixels))[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="pass txt_emb"):
        oc.reward(oc.embed_images(pixels))


def test_flow_grpo_pickscore_scaling(files):
    """flow_grpo's PickScoreScorer: ``logit_scale * (text_embs @ image_embs.T)).diag() / 26``, per image."""
    from fastlclip.rewards import _features

    t = tt.build_teachers(specs(files, scale_hf="flow_grpo")[:2])["pick"]
    assert t.reward_form.scale == pytest.approx(1 / 26)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prompts = ["a dog", "a red cat on a mat", "two cars"]
    image_embs = _features(files["hf"].get_image_features(pixel_values=t.preprocess(pixels)))
    image_embs = image_embs / image_embs.norm(p=2, dim=-1, keepdim=True)
    tok = t.tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=77)
    text_embs = _features(files["hf"].get_text_features(**tok))
    text_embs = text_embs / text_embs.norm(p=2, dim=-1, keepdim=True)
    want = (files["hf"].logit_scale.exp() * (text_embs @ image_embs.T)).diag() / 26
    torch.testing.assert_close(t.score(t.embed_images(pixels), t.embed_texts(prompts)), want)
    with pytest.raises(ValueError, match="flow_grpo"):
        tt.reward_form("hps", "flow_grpo")


def test_reward_forms_and_presets():
    assert tt.reward_form("hps") == tt.RewardForm("cos", 1.0, 1.0, "hps")
    assert tt.reward_form("pickscore").constant == 30.0 and tt.reward_form("clip").constant == 100.0
    assert tt.reward_form("aesthetic") == tt.RewardForm("head", 10.0, 1.0, "aesthetic")
    assert tt.reward_form("logit:42", 0.5) == tt.RewardForm("logit", 42.0, 0.5)
    assert tt.reward_form(tt.RewardForm("cos", 2.0, 3.0)).scale == 3.0
    for bad in ("cosine", "logit:x", "head"):
        with pytest.raises(ValueError, match="FORM:CONSTANT"):
            tt.reward_form(bad)
    with pytest.raises(ValueError, match="non-zero"):
        tt.reward_form("hps", 0)


class Payload:
    """An object a weights file must not carry (a pickle of it would run code on load)."""


def test_the_published_aesthetic_layout_and_safe_reading(tmp_path):
    mlp = tt.AestheticMLP()
    assert [m.weight.shape[1] for m in mlp.layers if isinstance(m, torch.nn.Linear)] == [768, 1024, 128, 64, 16]
    sd = mlp.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "a.pth")
    got = tt.AestheticMLP.from_state_dict(tt.read_state_dict(tmp_path / "a.pth", "w"))
    assert all(torch.equal(got.state_dict()[k], v) for k, v in sd.items())

    torch.save({"state_dict": sd, "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused to load"):
        tt.read_state_dict(tmp_path / "evil.pth", "w")
    with pytest.raises(ValueError, match="not an aesthetic MLP"):
        tt.AestheticMLP.from_state_dict({"x": torch.zeros(1)})


@pytest.mark.parametrize("text, message", [
    ("name=a", "kind= is required"),
    ("name=a,kind=hf,model", "is not key=value"),
    ("name=a,kind=hf,colour=red", "unknown key 'colour'"),
    ("name=a,kind=hf,name=b", "name given twice"),
])
def test_spec_parsing_refusals(text, message):
    with pytest.raises(ValueError, match=message):
        tt.parse_teacher_spec(text)


def test_teacher_set_checks(files, tmp_path):
    good = specs(files)
    assert [s.name for s in tt.check_teacher_set(list(reversed(good)))] == ["pick", "hps", "aes"]  # heads last
    spec = tt.parse_teacher_spec(f"name=pick,kind=hf,model={files['dir'] / 'hf_model'},reward=pickscore,scale=flow_grpo")
    assert (spec.kind, spec.reward, spec.scale) == ("hf", "pickscore", "flow_grpo")
    cases = [
        ([good[0], good[0]], "unique"),
        ([tt.TeacherSpec("Bad-Name", "hf", model="x")], "lowercase identifier"),
        ([tt.TeacherSpec("a", "timm", model="x")], "kind 'timm'"),
        ([good[0], tt.TeacherSpec("aes", "aesthetic", base="nope", weights=good[2].weights)], "base= must name"),
        ([good[0], tt.TeacherSpec("a2", "aesthetic", base="hps")], "weights="),
        ([tt.TeacherSpec("a", "hf", model=str(tmp_path / "none"))], "not a local folder"),
        ([tt.TeacherSpec("a", "open_clip", model="no-such-model")], "unknown open_clip model"),
        ([tt.TeacherSpec("a", "open_clip", model="ViT-B-16", reward="aesthetic")], "does not fit"),
        ([tt.TeacherSpec("a", "open_clip", model="ViT-B-16", weights=str(tmp_path / "w.pt"))], "is not a file"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            tt.check_teacher_set(bad)


def test_describe_names_weights_digest_reward_and_preprocessing(built, files):
    from fastlclip.corpus.scoring import fingerprint

    d = {k: t.describe() for k, t in built.items()}
    assert d["hps"]["weights_sha256"] == fingerprint(None, str(files["dir"] / "oc.safetensors"))["pretrained_sha256"]
    assert d["pick"]["weights_sha256"] == fingerprint(None, str(files["dir"] / "hf_model"))["pretrained_sha256"]
    assert d["aes"]["base"] == "hps" and d["aes"]["reward"]["form"] == "head"
    assert d["pick"]["reward"] == {"form": "logit", "constant": 30.0, "scale": 1.0, "preset": "pickscore"}
    assert d["hps"]["preprocess"]["mean"] == [0.5, 0.45, 0.4] and d["pick"]["preprocess"]["crop"] == 24
    assert all(isinstance(t, tt.Teacher) for t in built.values())


# -- part 2: targets ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vae():
    return make_vae()


def shards_with_prompts(vae, folder, n=10, per_shard=5):
    """latent.npy shards; sample i carries a txt prompt (even i), a json caption (i % 3 == 1) or nothing."""
    paths = write_shards(vae, folder, n, per_shard)
    for path in paths:
        with tarfile.open(path) as tf:
            members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
        with tarfile.open(path, "w") as tf:
            for m, data in members:
                tf.addfile(m, io.BytesIO(data))
                i = int(m.name.split(".")[0])
                extra = (f"{i:06d}.txt", f"prompt {i}".encode()) if i % 2 == 0 else (
                    (f"{i:06d}.json", json.dumps({"caption": f"caption {i}"}).encode()) if i % 3 == 1 else None)
                if extra:
                    info = tarfile.TarInfo(extra[0])
                    info.size = len(extra[1])
                    tf.addfile(info, io.BytesIO(extra[1]))
    return paths


def test_multi_teacher_targets_in_one_pass(files, vae, tmp_path, monkeypatch):
    shards = shards_with_prompts(vae, tmp_path / "shards")
    calls = []
    decode = vae.decode

    def counted(z, *a, **kw):
        calls.append(z.shape[0])
        return decode(z, *a, **kw)

    monkeypatch.setattr(vae, "decode", counted)
    embeds = {}
    for cls in (tt.OpenCLIPTeacher, tt.HFCLIPTeacher):
        orig = cls.embed_images

        def spy(self, pixels, orig=orig):
            embeds[self.name] = embeds.get(self.name, 0) + pixels.shape[0]
            return orig(self, pixels)

        monkeypatch.setattr(cls, "embed_images", spy)
    embeds.clear()  # make_targets builds the set once to check and describe it, embedding nothing
    report = make_targets(shards, tmp_path / "t", vae=vae, teachers=specs(files), batch_size=4, progress=False)
    assert report.rows == 10 and not report.failed
    assert sum(calls) == 10  # one decode per sample for all three teachers
    assert embeds == {"hps": 10, "pick": 10}  # the head reads its base's embedding

    t = read_targets(tmp_path / "t", teacher="hps")
    assert set(t.columns) == {"hps", "pick"} and set(t.scores) == {"aes"}
    assert t.columns["hps"].shape == (10, 32) and t.columns["pick"].shape == (10, 16) and t.scores["aes"].shape == (10,)
    assert torch.equal(t.embeddings, t.columns["hps"]) and t.embeddings.dtype == torch.float16
    info = t.info
    assert [x["name"] for x in info["teachers"]] == ["hps", "pick", "aes"] and info["teacher"] is None
    assert all(len(x["weights_sha256"]) == 64 for x in info["teachers"])
    # the columns are each teacher's embedding of the decoded latent, by hand
    built = tt.build_teachers(specs(files))
    raw = t.latents[:4].float()
    with torch.no_grad():
        pixels = ((decode(raw).sample + 1) / 2).clamp(0, 1)
        for name in ("hps", "pick"):
            want = built[name].embed_images(pixels)
            assert F.cosine_similarity(t.columns[name][:4].float(), want).min() > 0.999
        want = built["aes"].score(built["hps"].embed_images(pixels))
        torch.testing.assert_close(t.scores["aes"][:4], want, atol=2e-2, rtol=1e-2)
    # prompts kept: txt first, then a json caption, None without either
    for key, prompt in zip(t.keys, t.prompts):
        i = int(key)
        assert prompt == (f"prompt {i}" if i % 2 == 0 else f"caption {i}" if i % 3 == 1 else None)
    assert t.subset(torch.arange(10) < 3).prompts == t.prompts[:3]
    with pytest.raises(ValueError, match="several teachers"):
        read_targets(tmp_path / "t")

    # the identity names the set: a rerun resumes, another set is refused with both sets named
    calls.clear()
    assert len(make_targets(shards, tmp_path / "t", vae=vae, teachers=specs(files), progress=False).skipped) == 2
    assert calls == []
    for other in (specs(files)[:2], specs(files) + [tt.TeacherSpec("clip2", "hf", model=specs(files)[1].model,
                                                                   processor=specs(files)[1].processor)]):
        with pytest.raises(ValueError, match="holds targets of the teacher set .*hps.*pick.*aes.*not supported"):
            make_targets(shards, tmp_path / "t", vae=vae, teachers=other, progress=False)
    with pytest.raises(ValueError, match="teacher set"):
        make_targets(shards, tmp_path / "t", vae=vae, teacher=files["oc"], progress=False)


def test_a_single_teacher_set_reads_as_before_and_image_shards_embed_the_image(files, vae, tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "img"
    folder.mkdir()
    pics = ((images(4, 5) + 1) / 2 * 255).round().to(torch.uint8)
    with tarfile.open(folder / "00000.tar", "w") as tf:
        for i, p in enumerate(pics):
            buf = io.BytesIO()
            Image.fromarray(p.permute(1, 2, 0).numpy()).save(buf, format="PNG")
            for name, data in ((f"{i:06d}.png", buf.getvalue()), (f"{i:06d}.txt", f"p{i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(vae, "decode", lambda *a, **k: pytest.fail("image shards are never decoded"))
    make_targets([folder], tmp_path / "t", vae=vae, teachers=specs(files)[1:2], progress=False)
    t = read_targets(tmp_path / "t")  # one CLIP teacher: its column is the embeddings
    assert t.embeddings.shape == (4, 16) and t.prompts == ["p0", "p1", "p2", "p3"]
    want = tt.build_teachers(specs(files)[1:2])["pick"].embed_images(pics.float() / 255)
    assert F.cosine_similarity(t.embeddings.float(), want).min() > 0.999
    with pytest.raises(ValueError, match="has no embedding column"):
        read_targets(tmp_path / "t", teacher="hps")


def test_make_targets_takes_teacher_or_teachers(files, vae, tmp_path):
    shards = shards_with_prompts(vae, tmp_path / "s", 4, 2)
    make_targets(shards, tmp_path / "one", vae=vae, teacher=files["oc"], progress=False)  # one teacher, as before
    t = read_targets(tmp_path / "one")
    assert "teachers" not in t.info and t.columns == {} and t.embeddings.shape == (4, 32)
    assert t.prompts == ["prompt 0", "caption 1", "prompt 2", None]
    make_targets(shards, tmp_path / "none", vae=vae, teacher=files["oc"], progress=False, prompts=False)
    assert read_targets(tmp_path / "none").prompts is None and not (tmp_path / "none" / "prompts").exists()
    with pytest.raises(ValueError, match="teacher= is for teacher sets"):
        read_targets(tmp_path / "one", teacher="hps")
    with pytest.raises(ValueError, match="either teacher= .* or teachers="):
        make_targets(shards, tmp_path / "t", vae=vae, progress=False)
    with pytest.raises(ValueError, match="either teacher="):
        make_targets(shards, tmp_path / "t", vae=vae, teacher=files["oc"], teachers=specs(files), progress=False)


def test_cli_teacher_specs(files, vae, tmp_path, capsys):
    from fastlclip.distill.__main__ import main

    shards = write_shards(vae, tmp_path / "s", 4, 2)
    vae.save_pretrained(tmp_path / "vae")
    d = files["dir"]
    oc = f"name=hps,kind=open_clip,model=tiny-ens-oc2,config={d / 'oc.json'},weights={d / 'oc.safetensors'},reward=hps"
    aes = f"name=aes,kind=aesthetic,base=hps,weights={d / 'aesthetic.safetensors'}"
    base = ["targets", str(tmp_path / "s"), "--out", str(tmp_path / "t"), "--vae", str(tmp_path / "vae")]
    for extra, message in [([], "--teacher .* or --teacher-spec .* is required"),
                           (["--teacher", "ViT-B-16", "--teacher-spec", oc], "not both"),
                           (["--teacher-spec", "name=x"], "kind= is required"),
                           (["--teacher-spec", oc, "--teacher-spec", aes.replace("base=hps", "base=zz")], "base= must name"),
                           (["--teacher-spec", oc, "--teacher-pretrained", "w.pt"], "go with --teacher"),
                           (["--teacher-spec", oc, "--teacher-spec", aes.replace("aesthetic.safetensors", "oc.safetensors")],
                            "not an aesthetic MLP state dict")]:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and __import__("re").search(message, err), err
        assert not (tmp_path / "t").exists()  # refused before any work
    assert main(base + ["--teacher-spec", oc, "--teacher-spec", aes, "--batch-size", "3"]) == 0
    t = read_targets(tmp_path / "t")
    assert len(t) == 4 and set(t.columns) == {"hps"} and set(t.scores) == {"aes"} and t.prompts is None


def test_shard_prompts_from_parquet_and_odd_members(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastlclip.distill.targets import shard_prompts

    pq.write_table(pa.table({"key": ["a", "b"], "latent": [[0.0], [1.0]], "caption": ["x", None]}), tmp_path / "s.parquet")
    assert shard_prompts(tmp_path / "s.parquet") == {"a": "x"}
    pq.write_table(pa.table({"latent": [[0.0]], "prompt": ["y"]}), tmp_path / "t.parquet")
    assert shard_prompts(tmp_path / "t.parquet") == {"t/0": "y"}
    with tarfile.open(tmp_path / "u.tar", "w") as tf:
        for name, data in (("k1.json", b'"plain"'), ("k2.json", b"[1]"), ("k3.txt", b"\xff\xfe"),
                           ("k4.json", b'{"text": "t4"}'), ("k4.txt", b" first \n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    assert shard_prompts(tmp_path / "u.tar") == {"k1": "plain", "k4": "first"}  # txt wins over json
    (tmp_path / "bad.tar").write_bytes(b"not a tar")
    assert shard_prompts(tmp_path / "bad.tar") == {}
