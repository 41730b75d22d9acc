"""fastlclip.distill targets from video shards whose samples hold the frames as image members (``<key>.<n>.png``,
issue 34 part 3): the reader's (F, 3, H, W) clips, targets of the tiny Wan 2.1 world against a float64 reference
written here (PIL-decoded frames, the VAE's own posterior mean, the teacher on every frame, span means), and the
bad samples (a clip off the 1 + 4k rule, a gap in the frame numbers, frames of two sizes)."""

import copy
import io
import json
import warnings

import numpy as np
import torch
import torch.nn.functional as F

import tiny_video as tv
import video_distill_world as VW
from corpus_shards import png_bytes, write_tar

SPANS = [(0, 1), (1, 5)]  # 5 frames = 2 latent frames on the causal 4x layout: frame 0, then frames 1..4


def _clips(n: int, frames: int, seed: int) -> np.ndarray:
    """``n`` clips (n, F, 32, 32, 3) uint8: a smooth colour drift plus per-frame texture."""
    g = np.random.default_rng(seed)
    base = (VW.videos(n, frames, seed).permute(0, 2, 3, 4, 1).numpy() + 1) * 127.5
    return np.clip(base + g.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _members(clip: np.ndarray, order=None, skip=()) -> dict:
    order = range(len(clip)) if order is None else order
    return {f"{i}.png": png_bytes(clip[i]) for i in order if i not in skip}


def _reference(vae, teacher, members: dict):
    """(latent (C, T, h, w), targets (T, D)) in float64, written out from the PNG bytes."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from PIL import Image

    frames = [np.asarray(Image.open(io.BytesIO(members[f"{i}.png"])).convert("RGB")) for i in range(len(members))]
    x = torch.from_numpy(np.stack(frames)).double().permute(3, 0, 1, 2) / 255  # (3, F, H, W) in [0, 1]
    with torch.no_grad():
        latent = copy.deepcopy(vae).double().encode((x * 2 - 1)[None]).latent_dist.mean[0]
        mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        emb = F.normalize(copy.deepcopy(teacher).double().encode_image((x.transpose(0, 1) - mean) / std), dim=-1)
    return latent, F.normalize(torch.stack([emb[a:z].mean(0) for a, z in SPANS]), dim=-1)


def test_frame_member_shards_give_targets_as_latent_clips_do(tmp_path):
    from fastlclip import distill
    from fastlclip.corpus.readers import IMAGE_MEMBERS, read_shard

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        vae, teacher = tv.tiny_vae("wan2.1"), VW.make_teacher()
        clips = _clips(4, 5, 3)
        good = [("000000", _members(clips[0], order=[4, 2, 0, 1, 3])), ("000001", _members(clips[1]))]
        mixed = [("000002", _members(clips[2])),
                 ("000003", _members(clips[3][:4])),  # 4 frames: off the 1 + 4k rule
                 ("000004", _members(clips[3], skip=(2,))),  # a gap: frame 2 missing
                 ("000005", {**_members(clips[3][:4]), "4.png": png_bytes(clips[3][4][:16])})]  # two sizes
        write_tar(tmp_path / "00000.tar", good)
        write_tar(tmp_path / "00001.tar", mixed)

        samples = list(read_shard(tmp_path / "00000.tar", member=IMAGE_MEMBERS))
        assert [s.key for s in samples] == ["000000", "000001"] and all(s.error is None for s in samples)
        assert samples[0].latent.dtype == torch.uint8 and samples[0].latent.shape == (5, 3, 32, 32)
        assert torch.equal(samples[0].latent, torch.from_numpy(clips[0]).permute(0, 3, 1, 2))  # ordered by n
        errors = {s.key: s.error for s in read_shard(tmp_path / "00001.tar", member=IMAGE_MEMBERS)}
        assert errors["000002"] is None and errors["000003"] is None
        assert "gap" in errors["000004"] and "frame(s) 2 missing" in errors["000004"], errors
        assert "different sizes" in errors["000005"] and "frame 4 is (16, 32)" in errors["000005"], errors

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = distill.make_targets([tmp_path / "00000.tar", tmp_path / "00001.tar"], tmp_path / "t", vae=vae,
                                          teacher=teacher, batch_size=4, progress=False)
        assert report.rows == 3
        t = distill.read_targets(tmp_path / "t")
        assert t.info["latent_shape"] == [16, 2, 8, 8] and t.info["image_size"] == 32
        assert t.info["video"]["frames"] == 5 and t.info["video"]["spans"] == [list(s) for s in SPANS]
        assert t.clips == ["000000"] * 2 + ["000001"] * 2 + ["000002"] * 2 and t.frames.tolist() == [0, 1] * 3
        for i, (key, members) in enumerate([*good, mixed[0]]):
            latent, want = _reference(vae, teacher, members)
            assert (t.embeddings[2 * i:2 * i + 2].double() - want).abs().max() < 2e-3, key
            got = t.latents[2 * i:2 * i + 2].double().transpose(0, 1)  # back to (C, T, h, w)
            assert (got - latent).abs().max() < 2e-3 * max(1.0, latent.abs().max().item()), key
        assert ((want[0] - want[1]).norm() > 1e-2)  # frame 0's own span, not the mean over all frames

        bad = {b["key"]: b["error"] for line in (tmp_path / "t" / "manifest.jsonl").read_text().splitlines()
               for b in json.loads(line).get("bad", [])}
        assert set(bad) == {"000003", "000004", "000005"}, bad
        assert "a clip of 4 frames" in bad["000003"] and "F = 1 + 4 (T - 1)" in bad["000003"] \
            and "5 frames (T = 2 latent frames)" in bad["000003"], bad
        assert "gap" in bad["000004"] and "different sizes" in bad["000005"], bad
    finally:
        torch.set_num_threads(threads)
