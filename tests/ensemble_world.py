"""Tiny teacher set for the ensemble tests, as files: a tiny open_clip teacher (tests/distill_world.py's, its
shared direction removed) with a config and a weights file, a tiny transformers CLIPModel + processor folder (its
shared direction removed the same way), and a tiny aesthetic MLP on the open_clip teacher; plus latent shards whose
samples carry prompts. Used by tests/test_ensemble_student.py and tests/test_ensemble_eval_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from distill_world import TEACHER_CFG, images, make_teacher, write_shards
from fastlclip.distill import teachers as tt
from test_ensemble_teachers import clip_tokenizer, hf_clip, hf_processor

OC_MODEL = "tiny-ens-student-oc"


def teacher_files(d: Path, vae) -> dict:
    """The three teachers written under ``d``: ``specs`` (hps: open_clip, pick: hf, aes: aesthetic on hps),
    ``spec_args`` (the same as --teacher-spec arguments) and the in-memory ``oc``, ``hf`` and ``mlp``."""
    from safetensors.torch import save_file

    oc = make_teacher(vae)
    (d / "oc.json").write_text(json.dumps({"model_cfg": TEACHER_CFG}))
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(d / "oc.safetensors"))
    hf = hf_clip(image_size=24, seed=5)
    (d / "tok").mkdir(exist_ok=True)
    processor = hf_processor(clip_tokenizer(d / "tok"))
    with torch.no_grad():  # the direction every embedding shares projected out (as distill_world.make_teacher)
        decoded = vae.decode(vae.encode(images(128, 1)).latent_dist.mean).sample
        pre = tt.HFCLIPTeacher("x", hf, processor).preprocess((decoded / 2 + 0.5).clamp(0, 1))
        from fastlclip.rewards import _features

        m = F.normalize(_features(hf.get_image_features(pixel_values=pre)).mean(0), dim=0)
        w = hf.visual_projection.weight
        w.copy_(w - torch.outer(m, m @ w))
    hf.save_pretrained(d / "hf_model")
    processor.save_pretrained(d / "hf_processor")
    torch.manual_seed(6)
    mlp = tt.AestheticMLP((32, 16, 8, 8, 4, 1))
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(d / "aes.safetensors"))
    specs = [tt.TeacherSpec("hps", "open_clip", model=OC_MODEL, config=str(d / "oc.json"),
                            weights=str(d / "oc.safetensors"), reward="hps"),
             tt.TeacherSpec("pick", "hf", model=str(d / "hf_model"), processor=str(d / "hf_processor"),
                            reward="pickscore"),
             tt.TeacherSpec("aes", "aesthetic", base="hps", weights=str(d / "aes.safetensors"))]
    return {"specs": specs, "spec_args": spec_args(d), "oc": oc, "hf": hf, "mlp": mlp}


def spec_args(d: Path) -> list[str]:
    """:func:`teacher_files`' set as ``--teacher-spec`` arguments."""
    specs = [f"name=hps,kind=open_clip,model={OC_MODEL},config={d / 'oc.json'},weights={d / 'oc.safetensors'},"
             "reward=hps", f"name=pick,kind=hf,model={d / 'hf_model'},processor={d / 'hf_processor'},reward=pickscore",
             f"name=aes,kind=aesthetic,base=hps,weights={d / 'aes.safetensors'}"]
    return [x for s in specs for x in ("--teacher-spec", s)]


def prompt_shards(vae, folder: Path, n: int, per_shard: int, prompt_of, seed: int = 2) -> list[Path]:
    """``latent.npy`` WebDataset shards of raw VAE latents of :func:`distill_world.images` (``seed``), sample
    ``i`` with the ``txt`` member ``prompt_of(i)`` (none where it returns None)."""
    return write_shards(vae, folder, n, per_shard, seed, prompt_of)
