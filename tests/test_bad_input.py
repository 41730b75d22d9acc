"""Bad input that used to give a wrong answer: each is now a clear error naming the fix, or handled right.

Model configs, checkpoints and conversion, the zero-shot classifier, the safety checker, the I2P reader,
the pixel reward and the ReNO loop.
"""

import copy
import json
import math
import warnings

import pytest
import torch

import fastlclip
from conftest import TINY

LATENT = TINY["vision_cfg"]["image_size"] // 8


def _cfg(**changes):
    """TINY with ``changes`` applied: ``vision_cfg__heads=0`` sets ``cfg["vision_cfg"]["heads"] = 0``."""
    cfg = copy.deepcopy(TINY)
    for key, value in changes.items():
        *path, last = key.split("__")
        d = cfg
        for p in path:
            d = d[p]
        d[last] = value
    return cfg


# -- model configs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, match", [
    ({"vision_cfg__heads": 0}, r"vision_cfg.heads must be a positive integer, got 0"),
    ({"vision_cfg__head_width": 0}, r"vision_cfg.head_width must be a positive integer, got 0"),
    ({"vision_cfg__patch_size": 0}, r"vision_cfg.patch_size must be a positive integer, got 0"),
    ({"text_cfg__heads": 0}, r"text_cfg.heads must be a positive integer, got 0"),
    ({"vision_cfg__layers": -1}, r"vision_cfg.layers must be a positive integer, got -1"),
    ({"vision_cfg__width": 0}, r"vision_cfg.width must be a positive integer, got 0"),
    ({"embed_dim": 0}, r"embed_dim must be a positive integer, got 0"),
    ({"vision_cfg__image_size": -128}, r"vision_cfg.image_size must be a positive integer"),
    ({"vision_cfg__latent_factor": 0}, r"vision_cfg.latent_factor must be a positive integer"),
    ({"text_cfg__context_length": 0}, r"text_cfg.context_length must be a positive integer"),
    ({"vision_cfg__width": 64.5}, r"vision_cfg.width must be a positive integer, got 64.5"),
    ({"vision_cfg__layers": True}, r"vision_cfg.layers must be a positive integer, got True"),
    ({"vision_cfg__layers": "2"}, r"vision_cfg.layers must be a positive integer, got '2'"),
    ({"vision_cfg__mlp_ratio": 0}, r"vision_cfg.mlp_ratio must be a number in \(0, 16\]"),
    ({"vision_cfg__heads": 3}, r"vision width 64 is not divisible by heads 3"),
    ({"vision_cfg__patch_size": 3}, r"latent size 16 .* must be a multiple of patch_size 3"),
    ({"vision_cfg__image_size": 100}, r"image_size 100 must be a multiple of latent_factor 8"),
    ({"vision_cfg__layers": 10**9}, r"vision_cfg.layers must be at most 256, got 1000000000"),
    ({"text_cfg__width": 10**6, "text_cfg__heads": 1}, r"text_cfg.width must be at most 16384"),
    ({"vision_cfg__image_size": 8 * 4 * 1024}, r"vision_cfg.image_size must be at most"),
    ({"vision_cfg__width": 8192, "vision_cfg__head_width": 64, "vision_cfg__layers": 256}, r"about \d+ billion parameters"),
])
def test_config_values_are_validated_before_anything_is_built(change, match):
    cfg = _cfg(**change)
    with pytest.raises(ValueError, match=match):
        fastlclip.get_model_config(cfg)
    with pytest.raises(ValueError, match=match):
        fastlclip.add_model_config("bad", cfg)
    assert "bad" not in fastlclip.list_models()


def test_config_that_is_not_a_mapping_is_named():
    with pytest.raises(ValueError, match="vision_cfg must be a mapping"):
        fastlclip.get_model_config(_cfg(vision_cfg=[1, 2]))


def test_shipped_configs_pass_validation():
    for name in fastlclip.list_models():
        fastlclip.get_model_config(name)
