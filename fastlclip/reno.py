"""ReNO (reward-based noise optimisation, Eyring et al. 2024) with a one-step SDXL generator: SDXL-Turbo at
512 px (ReNO's setting) or an SDXL-architecture one-step model at 1024 px (see :data:`ONE_STEP_PRESETS`).

The initial noise is the parameter. Each iteration turns it into diffusion-space latents with one UNet
step, scores them with the rewards (losses, lower is better), adds the norm regulariser, and takes a
clipped Nesterov-SGD step; the latents of the iteration with the lowest reward loss are kept. Rewards
take ``reward(latents, prompt) -> scalar loss`` on diffusion-space latents and carry ``.name`` and
``.weighting`` (``fastlclip.LatentCLIPReward``, ``fastlclip.PixelCLIPReward``, or your own).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import numbers
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .inputs import check_count, check_number, check_prompt
from .model_configs import sdxl_unet_config, sdxl_vae_config
from .runtime import runtime_of

# stabilityai/sdxl-turbo's scheduler: SDXL's betas, epsilon prediction, trailing timestep spacing.
SDXL_TURBO_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class OneStepPreset:
    """How a one-step SDXL-architecture model samples: a diffusers scheduler, the settings its authors
    publish, and its native resolution. The step always lands on sigma 0, so it is deterministic:
    ``x = noise * init_noise_sigma``, ``out = unet(x / sqrt(sigma^2 + 1), t)``, latents = ``x - sigma * out``
    (epsilon prediction) or ``out`` (sample, i.e. x0, prediction)."""

    name: str
    scheduler: str  # diffusers scheduler class
    overrides: Mapping[str, Any]  # over the pipeline's (or SDXL's) scheduler config
    timesteps: tuple[int, ...] | None  # custom timesteps; None: set_timesteps(1)
    resolution: int  # native image side, px
    source: str


ONE_STEP_PRESETS: dict[str, OneStepPreset] = {p.name: p for p in (
    # ReNO's setting; stabilityai/sdxl-turbo's model card: guidance_scale=0.0, 1 step, trailing spacing, 512 px.
    OneStepPreset("sdxl-turbo", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, None, 512,
                  "https://huggingface.co/stabilityai/sdxl-turbo"),
    # ByteDance/SDXL-Lightning model card, "1-Step UNet": EulerDiscreteScheduler.from_config(..., timestep_spacing=
    # "trailing", prediction_type="sample"), num_inference_steps=1, guidance_scale=0; the 1-step model predicts x0
    # ("sample") where the 2/4/8-step ones predict epsilon. 1024 px, distilled from SDXL base 1.0.
    OneStepPreset("sdxl-lightning-1step", "EulerDiscreteScheduler",
                  {"timestep_spacing": "trailing", "prediction_type": "sample"}, None, 1024,
                  "https://huggingface.co/ByteDance/SDXL-Lightning"),
    # ByteDance/Hyper-SD, the authors' ComfyUI scheduler for Hyper-SDXL-1step-Unet
    # (comfyui/ComfyUI-HyperSDXL1StepUnetScheduler/node.py): timesteps [800], sigmas [sigma(800), 0], i.e. one
    # Euler step from t=800 to sigma 0 on noise scaled by sigma(800), epsilon prediction. diffusers' EulerDiscrete
    # with timesteps=[800] and trailing spacing is that step. The model card's diffusers example (LCMScheduler,
    # timesteps=[800]) could not be confirmed here; LCM would feed the UNet unit-variance noise where this feeds
    # sqrt(1 - alpha_bar_800) * noise (0.981 * noise) and add a c_skip * x term of about 4e-9: not measured on
    # the real weights.
    OneStepPreset("hyper-sdxl-1step", "EulerDiscreteScheduler",
                  {"timestep_spacing": "trailing", "prediction_type": "epsilon"}, (800,), 1024,
                  "https://huggingface.co/ByteDance/Hyper-SD"),
)}


def one_step_preset(name: str) -> OneStepPreset:
    if name not in ONE_STEP_PRESETS:
        raise ValueError(f"unknown one-step preset {name!r}; choose one of {sorted(ONE_STEP_PRESETS)}")
    return ONE_STEP_PRESETS[name]


# Phases of one iteration reported to a PhaseTimer, in order (backward phases are marked from autograd hooks).
PHASES = ("unet_fwd", "reward_fwd", "reward_bwd", "unet_bwd", "optimizer")


@dataclass
class PromptConditioning:
    """SDXL UNet conditioning for one prompt; ``random`` when it is random embeddings, not a text encoder's."""

    prompt_embeds: torch.Tensor  # (1, 77, cross_attention_dim)
    pooled_prompt_embeds: torch.Tensor  # (1, pooled_dim)
    time_ids: torch.Tensor  # (1, 6): original size, crop top-left, target size
    random: bool


class OneStepGenerator(nn.Module):
    """A one-step SDXL-architecture model as a generator: noise -> diffusion-space latents.

    ``preset`` (:data:`ONE_STEP_PRESETS`) says how the model samples: ``"sdxl-turbo"`` (512 px, ReNO's
    setting: one EulerAncestral step, trailing spacing, from t=999), ``"sdxl-lightning-1step"`` (1024 px,
    one Euler step from t=999 with x0 prediction) or ``"hyper-sdxl-1step"`` (1024 px, one Euler step from
    t=800, epsilon prediction). Each step ends at sigma 0: no ancestral noise, deterministic and
    differentiable in the noise. ``height``/``width`` default to the preset's resolution. Build with
    ``from_config`` (random weights) or ``from_pretrained`` (a local diffusers SDXL folder).
    """

    def __init__(self, unet: nn.Module, *, scheduler_config: Mapping[str, Any] | None = None, vae: nn.Module | None = None,
                 height: int | None = None, width: int | None = None,
                 prompt_encoder: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 random_weights: bool, preset: str = "sdxl-turbo"):
        super().__init__()
        import diffusers

        self.preset = one_step_preset(preset)
        height = self.preset.resolution if height is None else height
        width = self.preset.resolution if width is None else width
        cfg = unet.config
        if cfg.get("addition_embed_type") != "text_time":
            raise ValueError(f"the UNet must be SDXL-style (addition_embed_type 'text_time'), got {cfg.get('addition_embed_type')!r}")
        if vae is not None:
            from .vaes import latent_space

            latent_space(vae)  # its scaling factor, which decode divides by, finite and in range
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        for side, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % self.vae_scale_factor:
                raise ValueError(f"{side} must be a positive multiple of {self.vae_scale_factor} (the VAE's downsampling), got {v!r}")
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.height, self.width = height, width
        self.random_weights = random_weights
        self._prompt_encoder = prompt_encoder

        scheduler_cls = getattr(diffusers, self.preset.scheduler)
        scheduler = scheduler_cls.from_config(dict(scheduler_config or SDXL_TURBO_SCHEDULER), **self.preset.overrides)
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "sample"):
            raise ValueError(f"the one-step generator takes epsilon or sample (x0) prediction, got {self.prediction_type!r}")
        if self.preset.timesteps is None:
            scheduler.set_timesteps(1)
        else:
            scheduler.set_timesteps(timesteps=list(self.preset.timesteps))
        sigmas = scheduler.sigmas.double()
        if len(sigmas) != 2 or sigmas[1] != 0:
            raise ValueError(f"expected one step ending at sigma 0, got sigmas {sigmas.tolist()}")
        self.scheduler = scheduler  # defines the step; its constants are read once here
        self.timestep = float(scheduler.timesteps[0])
        self.sigma = float(sigmas[0])
        self.init_noise_sigma = float(scheduler.init_noise_sigma)

        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        if pooled <= 0:
            raise ValueError(f"UNet config: projection_class_embeddings_input_dim {cfg.projection_class_embeddings_input_dim} "
                             f"leaves no room for pooled text embeddings after 6 x addition_time_embed_dim {cfg.addition_time_embed_dim}")
        self.pooled_dim = pooled

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, unet_config: Mapping[str, Any] | None = None, vae_config: Mapping[str, Any] | None = None, *,
                    height: int | None = None, width: int | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0, with_vae: bool = True,
                    preset: str = "sdxl-turbo") -> "OneStepGenerator":
        """Random weights from configs (default: the shipped SDXL UNet and VAE configs), built on ``device``.
        ``preset``: the sampling of :data:`ONE_STEP_PRESETS`; sizes default to its resolution.

        Prompts get random embeddings (see ``encode_prompt``): timing is faithful, images are not.
        """
        from diffusers import AutoencoderKL, UNet2DConditionModel

        torch.manual_seed(check_seed(seed))
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(dict(unet_config or sdxl_unet_config()))
            vae = AutoencoderKL.from_config(dict(vae_config or sdxl_vae_config())) if with_vae else None
        # nn.Module.to, not ModelMixin.to: the latter warns about fp32-only modules, which these configs lack.
        nn.Module.to(unet, dtype=dtype)
        if vae is not None:
            nn.Module.to(vae, dtype=dtype)
        return cls(unet, vae=vae, height=height, width=width, random_weights=True, preset=preset)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        height: int | None = None, width: int | None = None, preset: str = "sdxl-turbo",
                        unet_weights: str | Path | None = None) -> "OneStepGenerator":
        """Load a local diffusers SDXL folder (unet/, vae/, text_encoder/, text_encoder_2/, tokenizers, scheduler/).

        ``preset="sdxl-turbo"``: a snapshot of stabilityai/sdxl-turbo. For the 1024 px one-step models pass
        a snapshot of stabilityai/stable-diffusion-xl-base-1.0 and the one-step UNet's ``.safetensors``
        state dict as ``unet_weights`` (loaded into ``unet/`` as the model cards do), with
        ``preset="sdxl-lightning-1step"`` or ``"hyper-sdxl-1step"``. The folder's scheduler config is
        taken with the preset's settings over it."""
        one_step_preset(preset)
        path = Path(path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass a local SDXL "
                                    "folder, e.g. a snapshot of stabilityai/sdxl-turbo or stabilityai/stable-diffusion-xl-base-1.0")
        if importlib.util.find_spec("transformers") is None:
            raise ImportError("real SDXL weights need the SDXL text encoders, which need the 'transformers' package: "
                              "pip install transformers")
        from diffusers import StableDiffusionXLPipeline

        unet_dir = path / "unet"
        fp16_only = any(unet_dir.glob("*.fp16.safetensors")) and not any(unet_dir.glob("diffusion_pytorch_model.safetensors"))
        pipe = StableDiffusionXLPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True,
                                                         variant="fp16" if fp16_only else None)
        if unet_weights is not None:
            from safetensors.torch import load_file

            pipe.unet.load_state_dict(load_file(str(unet_weights)))
        pipe.to(device)
        return cls.from_pipeline(pipe, height=height, width=width, preset=preset)

    @classmethod
    def from_pipeline(cls, pipe, *, height: int | None = None, width: int | None = None,
                      preset: str = "sdxl-turbo") -> "OneStepGenerator":
        """The generator of a loaded diffusers SDXL pipeline (``StableDiffusionXLPipeline`` or a subclass, such as
        ReNO's ``RewardStableDiffusionXL``): its UNet, VAE, scheduler config and text encoders, shared, not copied,
        on the pipeline's device and dtype."""
        for name in ("unet", "vae", "scheduler", "encode_prompt"):
            if getattr(pipe, name, None) is None:
                raise TypeError(f"pipe must be a diffusers SDXL pipeline (unet, vae, scheduler, encode_prompt); "
                                f"{type(pipe).__name__} has no {name!r}")
        for module in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.eval().requires_grad_(False)

        def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, device=pipe.unet.device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
            return embeds, pooled

        return cls(pipe.unet, scheduler_config=pipe.scheduler.config, vae=pipe.vae, height=height, width=width,
                   prompt_encoder=encode, random_weights=False, preset=preset)

    # -- properties -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (1, self.unet.config.in_channels, self.height // self.vae_scale_factor, self.width // self.vae_scale_factor)

    @property
    def random_prompt(self) -> bool:
        """True when prompts get random embeddings (no text encoders loaded)."""
        return self._prompt_encoder is None

    # -- use ------------------------------------------------------------------------------------
    def compile(self, **kwargs) -> "OneStepGenerator":
        """Compile the UNet in place (``nn.Module.compile(**kwargs)``); the first calls after pay for it."""
        self.unet.compile(**kwargs)
        return self

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Checkpoint the UNet's resnets and transformer blocks (see :func:`checkpoint_diffusers`)."""
        checkpoint_diffusers(self.unet, enabled)

    def encode_prompt(self, prompt: str) -> PromptConditioning:
        """UNet conditioning for ``prompt``: the SDXL text encoders, or seeded random embeddings without them."""
        check_prompt(prompt)
        cfg = self.unet.config
        if self._prompt_encoder is None:
            g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little"))
            embeds = torch.randn(1, 77, cfg.cross_attention_dim, generator=g)
            pooled = torch.randn(1, self.pooled_dim, generator=g)
        else:
            embeds, pooled = self._prompt_encoder(prompt)
            if embeds.shape[-1] != cfg.cross_attention_dim or pooled.shape[-1] != self.pooled_dim:
                raise ValueError(f"text encoders give widths {embeds.shape[-1]}/{pooled.shape[-1]}, the UNet expects "
                                 f"{cfg.cross_attention_dim}/{self.pooled_dim}")
        time_ids = torch.tensor([[self.height, self.width, 0, 0, self.height, self.width]], dtype=torch.float32)
        to = dict(device=self.device, dtype=self.dtype)
        return PromptConditioning(embeds.to(**to), pooled.to(**to), time_ids.to(**to), random=self._prompt_encoder is None)

    def forward(self, noise: torch.Tensor, cond: PromptConditioning) -> torch.Tensor:
        """Diffusion-space latents (float32) from standard-normal ``noise`` of shape (B, C, H/8, W/8)."""
        if noise.ndim != 4 or tuple(noise.shape[1:]) != self.latent_shape[1:]:
            raise ValueError(f"noise must have shape (B, {', '.join(map(str, self.latent_shape[1:]))}) for "
                             f"{self.height}x{self.width} images, got {tuple(noise.shape)}")
        b = noise.shape[0]
        x = noise.float() * self.init_noise_sigma
        model_in = (x / math.sqrt(self.sigma**2 + 1)).to(self.dtype)
        t = torch.full((), self.timestep, device=noise.device)  # a fill, not a host copy: no sync
        added = {"text_embeds": cond.pooled_prompt_embeds.expand(b, -1), "time_ids": cond.time_ids.expand(b, -1)}
        out = self.unet(model_in, t, encoder_hidden_states=cond.prompt_embeds.expand(b, -1, -1), added_cond_kwargs=added,
                        return_dict=False)[0]
        if self.prediction_type == "sample":  # x0 prediction: the Euler step to sigma 0 lands on it
            return out.float()
        return x - self.sigma * out.float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, 3, H, W), from diffusion-space latents."""
        if self.vae is None:
            raise ValueError("this generator has no VAE to decode with; build it with with_vae=True or from_pretrained")
        vae = self.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


class Reward(Protocol):
    """ReNO's reward interface: a differentiable loss (lower is better) on diffusion-space latents."""

    name: str
    weighting: float

    def __call__(self, latents: torch.Tensor, prompt: str) -> torch.Tensor: ...


class PhaseTimer(Protocol):
    """Timing hook for ``optimize``: told when each phase of ``PHASES`` starts (phases may repeat in an iteration)."""

    def phase(self, name: str) -> None: ...

    def end_iteration(self) -> None: ...


def _check_reward(reward: Any) -> None:
    if not callable(reward) or not isinstance(getattr(reward, "name", None), str) \
            or not isinstance(getattr(reward, "weighting", None), numbers.Real):
        raise TypeError(f"a reward must be callable as reward(latents, prompt) -> loss and have .name (str) and .weighting "
                        f"(float), got {type(reward).__name__}")
    check_number(reward.weighting, f"reward {reward.name!r}: weighting", minimum=0)


def check_seed(seed: Any) -> int:
    """A seed ``torch.Generator.manual_seed`` takes: an int in [0, 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


class WeightedReward:
    """Weighted sum of rewards, itself a reward: ``sum_i w_i * reward_i(latents, prompt)``.

    Weights default to each reward's ``.weighting`` (ReNO's convention).
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        rewards = list(rewards)
        if not rewards:
            raise ValueError("WeightedReward needs at least one reward")
        for r in rewards:
            _check_reward(r)
        weights = [r.weighting for r in rewards] if weights is None else list(weights)
        if len(weights) != len(rewards):
            raise ValueError(f"got {len(weights)} weights for {len(rewards)} rewards")
        # Explicit weights may be negative (a difference of rewards); a reward's own .weighting may not.
        weights = [check_number(w, f"weights[{i}]") for i, w in enumerate(weights)]
        self.rewards, self.weights = rewards, weights
        self.name = " + ".join(f"{w:g}*{r.name}" for r, w in zip(rewards, weights))
        self.weighting = 1.0

    def losses(self, latents: torch.Tensor, prompt: str, checkpointed: Sequence[bool] | None = None) -> torch.Tensor:
        """Unweighted losses, float32 (K,); ``checkpointed[i]`` runs reward i under ``torch.utils.checkpoint``."""
        out = []
        for i, r in enumerate(self.rewards):
            if checkpointed is not None and checkpointed[i]:
                loss = checkpoint(r, latents, prompt, use_reentrant=False)
            else:
                loss = r(latents, prompt)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"reward {r.name!r} must return a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")
            out.append(loss.reshape(()).float())
        return torch.stack(out)

    def __call__(self, latents: torch.Tensor, prompt: str) -> torch.Tensor:
        losses = self.losses(latents, prompt)
        return sum(w * losses[i] for i, w in enumerate(self.weights))  # Python-float weights: no host-to-device copy


# What diffusers checkpoints inside its models, by class name (diffusers 0.30 to current).
_CHECKPOINT_UNITS = frozenset({"ResnetBlock2D", "BasicTransformerBlock", "Attention", "AutoencoderTinyBlock"})


def _checkpointed_forward(self, *args, **kwargs):
    forward = type(self).forward.__get__(self)
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def checkpoint_diffusers(model: nn.Module, enabled: bool) -> None:
    """Gradient checkpointing of a diffusers model (UNet, VAE, tiny autoencoder), done here: each resnet,
    transformer block, attention and tiny-autoencoder block runs under ``torch.utils.checkpoint``
    whenever gradients are on, in eval mode too.

    diffusers' own switch (``enable_gradient_checkpointing``) checkpoints only in training mode up to at
    least 0.30 (ReNO's pin and this package's floor), where ReNO's models run in eval: it would silently
    do nothing. It is turned off here, so the two never nest. The switch is an instance ``forward`` on
    each of those modules (the state dict is unchanged); ``enabled=False`` removes it.
    """
    if getattr(model, "is_gradient_checkpointing", False):
        model.disable_gradient_checkpointing()
    stack = [model]
    while stack:
        for child in stack.pop().children():
            if type(child).__name__ not in _CHECKPOINT_UNITS:
                stack.append(child)
            elif enabled:
                child.forward = types.MethodType(_checkpointed_forward, child)
            else:
                child.__dict__.pop("forward", None)


def is_checkpointing(model: nn.Module) -> bool:
    """Whether :func:`checkpoint_diffusers` has checkpointing on in ``model``."""
    return any(getattr(m.__dict__.get("forward"), "__func__", None) is _checkpointed_forward for m in model.modules())


def set_reward_checkpointing(rewards: Sequence[Reward], enabled: bool) -> list[bool]:
    """Set checkpointing on the rewards' own modules; returns, per reward, whether to checkpoint its whole forward.

    A diffusers model inside a reward (the VAE of a decode-then-CLIP reward) gets
    :func:`checkpoint_diffusers`; a CLIP with per-block checkpointing (open_clip's
    ``set_grad_checkpointing``) gets that. A reward with no such CLIP runs its whole forward under
    ``torch.utils.checkpoint`` instead, unless its model runs as a CUDA graph or compiled step (the
    ``graph`` / ``compile`` backends): such a step keeps only its own static memory, and recomputing it
    would replay it twice.
    """
    wrap = []
    for reward in rewards:
        if isinstance(reward, nn.Module):
            modules = [reward, *reward.children()]
        else:
            modules = [m for m in getattr(reward, "__dict__", {}).values() if isinstance(m, nn.Module)]
        per_block = False
        for m in modules:
            if hasattr(m, "enable_gradient_checkpointing"):  # a diffusers model
                checkpoint_diffusers(m, enabled)
            if hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(enabled)
                per_block = True
        wrap.append(enabled and not per_block and runtime_of(getattr(reward, "model", None)) is None)
    return wrap


def norm_regularizer(noise: torch.Tensor, weight: float) -> torch.Tensor:
    """ReNO's regulariser ``weight * (0.5 ||z||^2 - (d - 1) log ||z||)``, float32, d = elements per sample.

    It is minus the log-density of the chi distribution of ||z|| for d-dimensional standard-normal noise.
    """
    d = math.prod(noise.shape[1:])
    norm = torch.linalg.vector_norm(noise.float())
    return weight * (0.5 * norm**2 - (d - 1) * torch.log(norm))


@dataclass
class ReNOResult:
    """Outcome of ``optimize``; losses are the weighted reward losses, without the regulariser."""

    best_latents: torch.Tensor  # diffusion-space latents of the best iteration
    best_noise: torch.Tensor  # the noise that produced them
    best_loss: float
    best_iteration: int
    losses: list[float]  # per iteration
    component_losses: dict[str, list[float]]  # unweighted, per reward, per iteration
    image: torch.Tensor | None = None  # best image in [0, 1] when decode=True
    random_prompt: bool = False


class _Health:
    """Per-iteration finiteness of noise, latents, regulariser and gradient, kept on the device: ``optimize`` reads it
    only after a non-finite loss or an error, to say which of them went first and which setting to change."""

    def __init__(self, iterations: int, device: torch.device):
        self.noise_ok = torch.ones(iterations, dtype=torch.bool, device=device)
        self.wide = torch.float32 if device.type == "mps" else torch.float64  # norms of huge noise stay finite
        self.noise_norm = torch.zeros(iterations, dtype=self.wide, device=device)
        self.latents = torch.ones(iterations, dtype=torch.bool, device=device)
        self.reg = torch.zeros(iterations, device=device)
        self.grad = torch.ones(iterations, dtype=torch.bool, device=device)
        self.d = 0

    def noise(self, i: int, noise: torch.Tensor) -> None:
        z = noise.detach()
        self.d = z[0].numel()
        self.noise_ok[i] = torch.isfinite(z).all()
        self.noise_norm[i] = torch.linalg.vector_norm(z.to(self.wide))

    def explain(self, last: int, all_losses: torch.Tensor, totals: torch.Tensor, combined: "WeightedReward",
                lr: float, reg_weight: float, partial: bool = False) -> str | None:
        """The first non-finite quantity up to iteration ``last`` (its losses unrecorded when ``partial``), or None."""
        noise_ok, norms, latents_ok = self.noise_ok.tolist(), self.noise_norm.tolist(), self.latents.tolist()
        regs, grad_ok = self.reg.tolist(), self.grad.tolist()
        losses, totals = all_losses.tolist(), totals.tolist()
        typical = math.sqrt(self.d)
        fix_lr = f"lr={lr:g} is too large: lower it (and keep grad_clip, e.g. 0.1)"
        for j in range(last + 1):
            if not noise_ok[j]:
                return (f"the noise became NaN/Inf in the SGD step after iteration {j - 1}, whose gradient was finite: "
                        f"{fix_lr}")
            if not latents_ok[j]:
                grown = norms[j] > 10 * typical
                return (f"the generator turned the noise into NaN/Inf latents at iteration {j}: noise norm {norms[j]:.3g}, "
                        f"where standard-normal noise of this shape has about {typical:.3g}. "
                        + (fix_lr if grown else "The UNet overflows on this noise; run it in float32 or bfloat16"))
            if partial and j == last:
                return None  # the error came from this iteration's rewards, on finite latents: it is their own
            for k, name in enumerate(r.name for r in combined.rewards):
                if not math.isfinite(losses[j][k]):
                    return (f"reward {name!r} returned {losses[j][k]} at iteration {j} from finite latents; the reward "
                            "itself is at fault (its inputs were fine): check it, or its weights and dtype")
            if not math.isfinite(totals[j]):
                return (f"the weighted reward loss is {totals[j]} at iteration {j} although every reward is finite: "
                        f"the weights {combined.weights} overflow it; use smaller weights")
            if reg_weight and not math.isfinite(regs[j]):
                return (f"the norm regulariser is {regs[j]} at iteration {j} (noise norm {norms[j]:.3g}): "
                        f"reg_weight={reg_weight:g} is too large; ReNO uses 0.01")
            if not grad_ok[j]:
                return (f"the gradient w.r.t. the noise became NaN/Inf at iteration {j} although the loss was finite: the "
                        f"backward pass overflowed; {fix_lr}, or run the UNet and rewards in float32")
        return None


def optimize(generator: OneStepGenerator, rewards: Reward | Sequence[Reward], prompt: str, *, iterations: int = 50,
             lr: float = 5.0, momentum: float = 0.9, nesterov: bool = True, grad_clip: float | None = 0.1,
             reg_weight: float = 0.01, seed: int = 0, noise: torch.Tensor | None = None,
             gradient_checkpointing: bool = False, decode: bool = False, progress: bool = True,
             timer: PhaseTimer | None = None) -> ReNOResult:
    """Optimise the initial noise of ``generator`` for ``prompt`` against ``rewards``.

    As ReNO: ``iterations`` evaluations, each followed by backward, ``clip_grad_norm_(grad_clip)`` and an
    SGD step except the last (whose update could not be evaluated). A list of rewards is summed with
    their ``.weighting``. ``gradient_checkpointing`` turns checkpointing on or off on the UNet and the
    rewards (see ``set_reward_checkpointing``) and leaves it so after the call. The loop itself never
    synchronises with the device (a Latent-CLIP reward's NaN check does: ``model.check_finite = False``):
    the best iterate is tracked on it and losses come back once, at the end. ``noise`` (default: standard normal
    from ``seed``, drawn on the CPU so every device starts alike) must have ``generator.latent_shape``.

    A loss that turns NaN/Inf raises ``FloatingPointError`` naming what went first: the noise after a step
    (``lr``), the generator's latents (noise grown by ``lr``, or a UNet overflow), a reward returning NaN on
    finite latents, the regulariser (``reg_weight``) or the gradient; never a ``best_loss`` of nan.
    """
    if not isinstance(generator, OneStepGenerator):
        raise TypeError(f"generator must be a OneStepGenerator, got {type(generator).__name__}")
    check_prompt(prompt)
    if isinstance(rewards, WeightedReward):
        combined = rewards
    else:
        combined = WeightedReward([rewards] if callable(rewards) else list(rewards))
    check_count(iterations, "iterations")
    check_number(lr, "lr", positive=True)
    if not 0 <= check_number(momentum, "momentum") < 1 or (nesterov and momentum == 0):
        raise ValueError(f"momentum must lie in [0, 1) and be > 0 with nesterov=True, got {momentum!r}")
    if grad_clip is not None:
        check_number(grad_clip, "grad_clip (None: no clipping)", positive=True)
    check_number(reg_weight, "reg_weight", minimum=0)
    seed = check_seed(seed)
    if decode and generator.vae is None:
        raise ValueError("decode=True needs a generator with a VAE")
    device = generator.device
    if noise is None:
        noise = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(noise.shape) != generator.latent_shape:
        raise ValueError(f"noise must have shape {generator.latent_shape}, got {tuple(noise.shape)}")
    noise = nn.Parameter(noise.detach().to(device=device, dtype=torch.float32).clone())
    if not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or Inf; pass finite (standard-normal) noise")
    if reg_weight and not noise.detach().any():
        raise ValueError("noise is all zeros: the norm regulariser's log ||z|| is -inf there and its gradient NaN; "
                         "pass standard-normal noise or reg_weight=0")

    generator.set_gradient_checkpointing(gradient_checkpointing)
    wrap = set_reward_checkpointing(combined.rewards, gradient_checkpointing)
    weights = torch.tensor(combined.weights, device=device)
    optimizer = torch.optim.SGD([noise], lr=lr, momentum=momentum, nesterov=nesterov)
    cond = generator.encode_prompt(prompt)
    mark = timer.phase if timer is not None else (lambda name: None)

    all_losses = torch.empty(iterations, len(combined.rewards), device=device)
    totals = torch.empty(iterations, device=device)
    iteration_ids = torch.arange(iterations, device=device)
    best_loss = best_latents = best_noise = best_iter = None
    # Where a non-finite loss came from, tracked on the device (no sync) and read only when something went wrong.
    health = _Health(iterations, device)
    steps = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="ReNO", unit="it", leave=False)
    i = 0
    try:
        for i in steps:
            optimizer.zero_grad(set_to_none=True)
            health.noise(i, noise)
            mark("unet_fwd")
            latents = generator(noise, cond)
            health.latents[i] = torch.isfinite(latents.detach()).all()
            mark("reward_fwd")
            losses = combined.losses(latents, prompt, wrap)
            total = (losses * weights).sum()
            mark("optimizer")
            all_losses[i] = losses.detach()
            totals[i] = total.detach()
            if i == 0:
                best_loss, best_latents, best_noise = total.detach().clone(), latents.detach().clone(), noise.detach().clone()
                best_iter = iteration_ids[0]
            else:
                better = total.detach() < best_loss
                best_loss = torch.where(better, total.detach(), best_loss)
                best_latents = torch.where(better, latents.detach(), best_latents)
                best_noise = torch.where(better, noise.detach(), best_noise)
                best_iter = torch.where(better, iteration_ids[i], best_iter)
            if i < iterations - 1:
                if reg_weight:
                    reg = norm_regularizer(noise, reg_weight)
                    health.reg[i] = reg.detach()
                    loss = total + reg
                else:
                    loss = total
                if timer is not None:
                    latents.register_hook(lambda grad: mark("unet_bwd"))
                mark("reward_bwd")
                loss.backward()
                mark("optimizer")
                health.grad[i] = torch.isfinite(noise.grad).all()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([noise], grad_clip)
                optimizer.step()
            if timer is not None:
                timer.end_iteration()
    except Exception as e:  # a reward refusing NaN latents must not hide what made them NaN
        reason = health.explain(i, all_losses, totals, combined, lr, reg_weight, partial=True)
        if reason is None:
            raise
        raise FloatingPointError(reason) from e

    if not torch.isfinite(totals).all():
        raise FloatingPointError(health.explain(iterations - 1, all_losses, totals, combined, lr, reg_weight)
                                 or "the loss became NaN/Inf; lower lr or reg_weight, and check the rewards")

    names = [r.name for r in combined.rewards]
    per_reward = all_losses.T.tolist()
    if len(set(names)) != len(names):
        names = [f"{n}[{k}]" for k, n in enumerate(names)]
    return ReNOResult(
        best_latents=best_latents, best_noise=best_noise, best_loss=float(best_loss), best_iteration=int(best_iter),
        losses=totals.tolist(), component_losses=dict(zip(names, per_reward)),
        image=generator.decode(best_latents) if decode else None, random_prompt=generator.random_prompt,
    )


class LatentCLIPLoss:
    """ReNO drop-in: a Latent-CLIP reward loss with the constructor of ReNO's ``BaseRewardLoss`` subclasses
    (``rewards/utils.py`` builds them as ``Loss(weighting, dtype, device, cache_dir, ...)``), its ``name`` /
    ``weighting`` attributes and its call ``loss(image, prompt) -> loss``.

    The loss scores latents, not the image: :meth:`attach` hooks the pipeline's ``decode_latents_tensors``
    (ReNO's ``RewardStableDiffusionXL``) so the diffusion-space latents it is given are kept, and the next
    call scores those, whatever image it is passed. ``model`` / ``pretrained``: the Latent-CLIP config and
    checkpoint, as ``fastlclip.load`` takes them (``model`` may also be a loaded ``LatentCLIP``); ``cache_dir``
    is where a ``hf-hub:`` checkpoint is downloaded. ``memsave`` is accepted for ReNO's call and unused: there
    is no decode in this reward to save memory in. The loss is ReNO's CLIP form
    ``100 - logit_scale.exp() * cos`` (``LatentCLIPReward``).
    """

    reads_latents = True

    def __init__(self, weighting: float, dtype: torch.dtype, device: str | torch.device, cache_dir: str | None = None,
                 *, model="Latent-ViT-B-8-512", pretrained="hf-hub:wendlerc/latent-clip-b-8-512-34b-80k",
                 memsave: bool = False, backend: str = "eager", resize: str | None = None, name: str = "LatentCLIP"):
        from .factory import load
        from .model import LatentCLIP
        from .rewards import LatentCLIPReward

        if isinstance(model, LatentCLIP):
            net = model
        else:
            net = load(model, pretrained, device=device, dtype=dtype, backend=backend, resize=resize, cache_dir=cache_dir)
        self.reward = LatentCLIPReward(net, weighting)
        self.name = name
        self.weighting = float(weighting)
        self._latents: torch.Tensor | None = None
        self._placeholder = None  # decode="best": (the image handed out, the decode)
        self._run, self._best = None, math.inf  # decode="best": (noise parameter, prompt) and its lowest loss

    def attach(self, pipe, *, decode: str = "no_grad"):
        """Keep the latents ``pipe.decode_latents_tensors(latents)`` decodes, for the next call of this loss.

        ``decode`` says what becomes of the decode:

        - ``"no_grad"`` (default): it still runs, for the image ReNO logs and saves, but outside autograd: it
          keeps no activations and its backward never runs.
        - ``"best"``: it runs only when the loss improves. The pipeline returns a black image of the right
          shape; when this loss's weighted value is the lowest of the run (ReNO's rule for its best image,
          strictly lower), the latents are decoded into that very tensor, which ReNO keeps as its best image.
          Only for Latent-CLIP as ReNO's sole reward: the other images (``--save_all_images``) stay black.
          A run is one noise parameter and prompt (``pipe.apply(latents, prompt, ...)``).
        - ``"full"``: the decode as it was, for when pixel rewards (HPS, ImageReward, CLIP, ...) share the
          loop: they need its gradient.

        Returns ``pipe``.
        """
        if decode not in ("no_grad", "best", "full"):
            raise ValueError(f"decode must be 'no_grad', 'best' or 'full', got {decode!r}")
        original = getattr(pipe, "decode_latents_tensors", None)
        if not callable(original):
            raise TypeError(f"attach needs ReNO's pipeline (decode_latents_tensors(latents) -> image); "
                            f"{type(pipe).__name__} has none")
        if decode == "best":
            apply = getattr(pipe, "apply", None)
            if not callable(apply):
                raise TypeError(f"decode='best' needs ReNO's pipeline (apply(latents, prompt, ...)); "
                                f"{type(pipe).__name__} has none")

            def apply_tracking_runs(latents, prompt=None, *args, **kwargs):
                if self._run is None or latents is not self._run[0] or prompt != self._run[1]:  # a new run
                    self._run, self._best = (latents, prompt), math.inf
                return apply(latents, prompt, *args, **kwargs)

            pipe.apply = apply_tracking_runs
            factor = getattr(pipe, "vae_scale_factor", 8)

        def decode_latents_tensors(latents):
            self._latents = latents
            if decode == "full":
                return original(latents)
            if decode == "best":
                # In the pipeline's dtype: ReNO's Hyper-SD path decodes fp32 latents and casts the image to fp16, a
                # cast that must not copy the tensor it keeps.
                image = latents.new_zeros(latents.shape[0], 3, latents.shape[-2] * factor, latents.shape[-1] * factor,
                                          dtype=getattr(getattr(pipe, "unet", None), "dtype", latents.dtype))
                self._placeholder = (image, original)
                return image
            with torch.no_grad():
                return original(latents)

        pipe.decode_latents_tensors = decode_latents_tensors
        return pipe

    def __call__(self, image: torch.Tensor, prompt: str) -> torch.Tensor:
        """The loss of the latents the attached pipeline last decoded (``image`` is not read)."""
        if self._latents is None:
            raise RuntimeError("LatentCLIPLoss has no latents to score: call loss.attach(pipe) once after building the "
                               "pipeline, so each decode hands its latents over (each decode's latents are scored once)")
        latents, self._latents = self._latents, None
        loss = self.reward(latents, prompt)
        if self._placeholder is not None:
            placeholder, decode = self._placeholder
            self._placeholder = None
            value = (0 + loss * self.weighting).item()  # as ReNO's trainer totals it
            if value < self._best:
                self._best = value
                with torch.no_grad():
                    placeholder.copy_(decode(latents.detach()))
        return loss


# ReNO's reward losses in the order its ``get_reward_losses`` builds them (ExplainableML/ReNO at
# bd6f6acfe369ee9c90e2c97c536113bdc1b6dcdb, rewards/utils.py; flags and defaults from arguments.py): the flag
# and weighting prefix, the loss's ``name`` (rewards/*.py), ``--enable_<prefix>``'s default, ``--<prefix>_weighting``'s
# default, and the ensemble's reward preset for it (None: no latent head can be one; ImageReward is not a
# pooled-embedding model).
RENO_REWARD_LOSSES: tuple[tuple[str, str, bool, float, str | None], ...] = (
    ("hps", "HPS", True, 5.0, "hps"),
    ("imagereward", "ImageReward", True, 1.0, None),
    ("clip", "CLIP", True, 0.01, "clip"),
    ("pickscore", "PickScore", True, 0.05, "pickscore"),
    ("aesthetic", "Aesthetic", False, 0.0, "aesthetic"),
)


class _Handoff:
    """The latents of the last decode of the pipelines attached for one ``RewardEnsemble``, for every
    ``LatentEnsembleLoss`` reading it (holds no reference to the ensemble)."""

    def __init__(self):
        self.latents: torch.Tensor | None = None
        self.decodes = 0

    def attach(self, pipe, decode: str):
        if decode not in ("no_grad", "full"):
            raise ValueError(f"decode must be 'no_grad' or 'full' for an ensemble's losses, got {decode!r} "
                             "('best' is LatentCLIPLoss's, for Latent-CLIP as ReNO's sole reward)")
        original = getattr(pipe, "decode_latents_tensors", None)
        if not callable(original):
            raise TypeError(f"attach needs ReNO's pipeline (decode_latents_tensors(latents) -> image); "
                            f"{type(pipe).__name__} has none")
        if getattr(original, "_fastlclip_handoff", None) is self:  # attached before (another head of the ensemble)
            original = original._fastlclip_original

        def decode_latents_tensors(latents):
            self.latents, self.decodes = latents, self.decodes + 1
            if decode == "full":
                return original(latents)
            with torch.no_grad():
                return original(latents)

        decode_latents_tensors._fastlclip_handoff = self
        decode_latents_tensors._fastlclip_original = original
        pipe.decode_latents_tensors = decode_latents_tensors


# Shared state, held only while some loss holds it: the RewardEnsemble of an ensemble file (by file, device and
# dtype) or of a LatentEnsemble (by object), and the hand-off of each RewardEnsemble.
_ENSEMBLES_BY_FILE: "weakref.WeakValueDictionary[tuple, Any]" = weakref.WeakValueDictionary()
_ENSEMBLES_BY_MODEL: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
_HANDOFFS: "weakref.WeakKeyDictionary[Any, _Handoff]" = weakref.WeakKeyDictionary()


def _shared_ensemble(model, pretrained, device, dtype):
    """The RewardEnsemble a LatentEnsembleLoss reads: ``model`` itself (a RewardEnsemble), the one of ``model``
    (a LatentEnsemble) or of the file ``pretrained``, shared by every loss built on the same one."""
    from .ensemble import LatentEnsemble
    from .rewards import RewardEnsemble

    if isinstance(model, RewardEnsemble):
        return model
    if isinstance(model, LatentEnsemble):
        reward = _ENSEMBLES_BY_MODEL.get(id(model))
        if reward is None or reward.model is not model:
            reward = RewardEnsemble(model, {h: 1.0 for h in model.head_names})
            _ENSEMBLES_BY_MODEL[id(model)] = reward
        return reward
    if model is not None:
        raise TypeError(f"model must be None (load pretrained=), a LatentEnsemble or a RewardEnsemble, "
                        f"got {type(model).__name__}")
    if not isinstance(pretrained, (str, Path)) or str(pretrained).startswith("hf-hub:"):
        raise ValueError(f"pretrained must be the path of a local ensemble .safetensors file, got {pretrained!r}")
    path = Path(pretrained)
    if not path.is_file():
        raise FileNotFoundError(f"no ensemble file at {path}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, str(torch.device(device)), dtype)
    reward = _ENSEMBLES_BY_FILE.get(key)
    if reward is None:
        try:
            net = LatentEnsemble.load(path, device=device, dtype=dtype)
        except ValueError as e:
            raise ValueError(f"LatentEnsembleLoss needs a reward ensemble file: {e} "
                             "(a single Latent-CLIP is ReNO's CLIP loss through LatentCLIPLoss)") from None
        reward = RewardEnsemble(net, {h: 1.0 for h in net.head_names})
        _ENSEMBLES_BY_FILE[key] = reward
    return reward


class LatentEnsembleLoss:
    """ReNO drop-in for one of its reward losses (HPS, PickScore, CLIP, aesthetic) read from a head of a latent
    reward ensemble (``fastlclip.LatentEnsemble``): ReNO's constructor ``Loss(weighting, dtype, device,
    cache_dir, ...)``, ``name`` / ``weighting`` and ``loss(image, prompt) -> loss``, as :class:`LatentCLIPLoss`.

    ``head``: the ensemble head it reads. ``pretrained``: a local ensemble ``.safetensors`` file, loaded on
    ``device`` in ``dtype``; or ``model=``: a loaded ``LatentEnsemble`` or a ``fastlclip.RewardEnsemble``. Every
    loss built on the same file (same device and dtype) or object shares one ``RewardEnsemble`` (``.ensemble``;
    its own weights are not used here), whose heads read one trunk forward per latents tensor
    (``RewardEnsemble.heads()``'s sharing): the trunk runs once per ReNO iteration whatever the number of heads.

    The call returns the head's ReNO loss (``constant - value``, averaged over the batch), unweighted, as
    ReNO's losses do: ReNO's trainer multiplies it by ``.weighting``. It scores the latents of the attached
    pipeline's last decode (:meth:`attach`: one call hooks the pipeline for every loss sharing the ensemble);
    each loss scores each decode once. ``cache_dir`` and ``memsave`` are accepted for ReNO's call and unused
    (the file is local; there is no decode to save memory in). ``name``: default the head's.
    :func:`ensemble_reward_losses` builds ReNO's whole list from its arguments.
    """

    reads_latents = True

    def __init__(self, weighting: float, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 cache_dir: str | None = None, *, head: str, pretrained: str | Path | None = None, model=None,
                 memsave: bool = False, name: str | None = None):
        from .rewards import _EnsembleHead

        self.weighting = check_number(weighting, "weighting", minimum=0)
        self.ensemble = _shared_ensemble(model, pretrained, device, dtype)
        heads = self.ensemble.model.head_names
        if head not in heads:
            raise ValueError(f"unknown head {head!r}; the ensemble's heads: {', '.join(heads)}")
        self.head = head
        self.name = head if name is None else name
        self._reward = _EnsembleHead(self.ensemble, head, self.weighting)
        self._handoff = _HANDOFFS.setdefault(self.ensemble, _Handoff())
        self._scored = self._handoff.decodes  # the last decode this loss scored: none made before it was built

    def attach(self, pipe, *, decode: str = "no_grad"):
        """Keep the latents ``pipe.decode_latents_tensors(latents)`` decodes for every loss on this ensemble
        (attaching another of them, or this one again, replaces the hook, never stacks it). ``decode``:
        ``"no_grad"`` (default; the decode still runs, for the image ReNO logs and saves, outside autograd) or
        ``"full"`` (the decode as it was, for pixel rewards in the same loop, such as ReNO's ImageReward).
        Returns ``pipe``."""
        self._handoff.attach(pipe, decode)
        return pipe

    def __call__(self, image: torch.Tensor, prompt: str) -> torch.Tensor:
        """This head's loss on the latents the attached pipeline last decoded (``image`` is not read)."""
        handoff = self._handoff
        if handoff.latents is None:
            raise RuntimeError(f"LatentEnsembleLoss {self.name!r} has no latents to score: call loss.attach(pipe) "
                               "once after building the pipeline, so each decode hands its latents over")
        if self._scored == handoff.decodes:
            raise RuntimeError(f"LatentEnsembleLoss {self.name!r} already scored the last decode's latents: each loss "
                               "scores each decode once")
        self._scored = handoff.decodes
        return self._reward(handoff.latents, prompt)


def ensemble_reward_losses(args, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                           cache_dir: str | None = None, *, pretrained: str | Path | None = None, model=None,
                           heads: Mapping[str, str] | None = None) -> list[LatentEnsembleLoss]:
    """ReNO's ``get_reward_losses(args, dtype, device, cache_dir)`` on a latent ensemble: one
    :class:`LatentEnsembleLoss` per reward ReNO's arguments enable (``args.enable_hps``, ``enable_imagereward``,
    ``enable_clip``, ``enable_pickscore``, ``enable_aesthetic``), in ReNO's order, weighted by
    ``args.<reward>_weighting`` and named as ReNO names them (``HPS``, ``CLIP``, ``PickScore``, ``Aesthetic``),
    all on one shared ``RewardEnsemble`` (one trunk forward per iteration). ``args``: ReNO's namespace or a
    dict; a flag it lacks takes ReNO's default (arguments.py: all enabled but the aesthetic; weightings 5, 1,
    0.01, 0.05, 0). Each reward reads the head whose reward preset is its own (``hps``, ``clip``, ``pickscore``,
    ``aesthetic``), or ``heads={"hps": HEAD, ...}``. An enabled reward with no head is an error, ImageReward
    always (no latent head can be one: run ReNO with ``--disable_imagereward``, or append ReNO's own loss and
    attach with ``decode="full"``)."""
    prefixes = [r[0] for r in RENO_REWARD_LOSSES]
    heads = dict(heads or {})
    for key in heads:
        if key not in prefixes:
            raise ValueError(f"heads: unknown ReNO reward {key!r}; ReNO's rewards: {', '.join(prefixes)}")

    def arg(key, default):
        if isinstance(args, Mapping):
            return args.get(key, default)
        return getattr(args, key, default)

    ensemble = _shared_ensemble(model, pretrained, device, dtype)
    net = ensemble.model
    presets = {h["name"]: (h.get("reward") or {}).get("preset") for h in net.heads}
    described = ", ".join(f"{n} ({p or 'no preset'})" for n, p in presets.items())
    losses = []
    for prefix, reno_name, enabled, weighting, preset in RENO_REWARD_LOSSES:
        if not arg(f"enable_{prefix}", enabled):
            continue
        if prefix in heads:
            head = heads[prefix]
        else:
            found = [n for n, p in presets.items() if preset is not None and p == preset]
            if len(found) != 1:
                why = ("no latent head can be it (ImageReward is not a pooled-embedding model)" if preset is None
                       else f"the ensemble has {'no' if not found else 'more than one'} head with reward preset "
                            f"{preset!r}")
                raise ValueError(f"ReNO's {reno_name} is enabled (enable_{prefix}) but {why}; its heads: {described}. "
                                 f"Disable it (--disable_{prefix}) or name its head: heads={{{prefix!r}: HEAD}}")
            head = found[0]
        losses.append(LatentEnsembleLoss(arg(f"{prefix}_weighting", weighting), dtype, device, cache_dir, head=head,
                                         model=ensemble, name=reno_name))
    return losses
