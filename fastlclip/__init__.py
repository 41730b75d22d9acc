"""fastlclip: fast, exact Latent-CLIP scoring of diffusion latents (SDXL's VAE, or any in ``list_vaes()``).

    model = fastlclip.load("Latent-ViT-B-8-512", "epoch_34.pt")
    feats = model.encode_latents(latents)          # SDXL pipeline latents, (B, 4, 64, 64)
    reward = fastlclip.LatentCLIPReward(model)     # ReNO reward: reward(latents, prompt) -> loss
"""

from .checkpoint import CheckpointError
from .factory import load
from .i2p import I2PPrompt, read_i2p
from .inputs import SDXL_SCALING_FACTOR, tokenize
from .model import LatentCLIP
from .model_configs import add_model_config, get_model_config, list_models
from .ensemble import LatentEnsemble
from .rewards import LatentCLIPReward, PixelAestheticReward, PixelCLIPReward, RewardEnsemble
from .safety import LatentSafetyChecker, SafetyCallback, SafetyCheck, SafetyGuidance
from .vaes import get_vae_config, list_vaes
from .zeroshot import ZeroShotClassifier, imagenet_classnames, imagenet_templates

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "I2PPrompt", "LatentCLIP", "LatentCLIPReward", "LatentEnsemble", "LatentSafetyChecker", "PixelAestheticReward",
    "PixelCLIPReward", "RewardEnsemble", "SDXL_SCALING_FACTOR", "SafetyCallback", "SafetyCheck", "SafetyGuidance", "ZeroShotClassifier",
    "add_model_config", "get_model_config", "get_vae_config", "imagenet_classnames", "imagenet_templates",
    "list_models", "list_vaes", "load", "read_i2p", "tokenize",
]
