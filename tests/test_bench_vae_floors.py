"""bench.reno_cost's decoder floors for the 16-channel spaces (meta-device counts, CPU): the SD3 / FLUX.1 VAE
decodes and tiny decoders at 1024 px beside a 16-channel Latent-ViT-B/8 tower, checked by hand-counted
differences from the SDXL rows."""

import pytest

from bench import flops, reno_cost
from bench.profiles import load_profiles

B8 = "Latent-ViT-B-8-512"


def test_16_channel_decode_and_tower_counts():
    # At 16 x 16 latents (128 px): the differences checked do not depend on the size, the counting time does.
    sdxl, sd3, flux = (flops.decode_work(v, False, 16) for v in ("vae", "sd3", "flux1"))
    # Same decoder as SDXL's but conv_in reads 16 channels (+12 x 512 x 3 x 3 weights) and there is no 4 -> 4
    # post-quant conv (-4 x 4 - 4): bf16 bytes.
    assert sd3.weight_bytes - sdxl.weight_bytes == 2 * (12 * 512 * 9 - 20)
    assert (sd3.total_flops, sd3.weight_bytes) == (flux.total_flops, flux.weight_bytes)  # one architecture
    assert sd3.total_flops > sdxl.total_flops
    # taef1's first conv reads 16 channels: +12 x 64 x 3 x 3 weights
    assert flops.decode_work("taef1", side=16).weight_bytes - flops.decode_work("taesd", side=16).weight_bytes == 2 * 12 * 64 * 9
    plain, wide = flops.latent_tower_work(B8, False, 16), flops.latent_tower_work(B8, False, 16, vae="flux1")
    # 4 patches of 8 x 8 x (16 - 4) more inputs into width 768: 2 FLOPs per MAC, forward and input backward.
    assert wide.total_flops - plain.total_flops == 2 * 2 * 4 * 12 * 64 * 768
    assert wide.weight_bytes - plain.weight_bytes == 2 * 12 * 64 * 768
    with pytest.raises(ValueError, match="decoder must be"):
        flops.decode_work("sd4")


def test_decoder_floors_list_the_16_channel_rows(monkeypatch):
    calls = []

    def fake(kind):
        def work(*args, **kw):
            calls.append((kind, args, kw))
            return flops.Work(kind, 2, 2, 2)
        return work

    for fn in ("decode_work", "latent_tower_work", "open_clip_tower_work"):  # the counts are tested above
        monkeypatch.setattr(flops, fn, fake(fn))
    selection = reno_cost.Selection("h100", None, [load_profiles()["h100"]], None, "")
    rows = reno_cost.decoder_floors(selection)["h100"]
    names = [r["component"] for r in rows]
    for name, call in (("SD3 VAE decode 1024 px", ("sd3", False, 128)), ("FLUX.1 VAE decode 1024 px", ("flux1", False, 128)),
                       ("TAESD3 decode 1024 px", ("taesd3", False, 128)), ("TAEF1 decode 1024 px", ("taef1", False, 128)),
                       ("Latent-ViT-B/8 tower 1024 px, 16 channels (interpolate)", (B8, False, 128))):
        assert calls[names.index(name)][1] == call
    assert calls[names.index("Latent-ViT-B/8 tower 1024 px, 16 channels (interpolate)")][2] == {"vae": "flux1"}
    assert "FLUX.1 VAE decode 1024 px" in reno_cost.decoder_floor_table({"h100": rows})
