"""Input checks and tokenisation: bad input gets an error naming the problem and the fix."""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from typing import Iterable, Sequence

import torch

from .vaes import TINY_FAMILY, get_vae_config, list_vaes, vae_channels

# SDXL VAE scaling factor: diffusion-space latents = VAE latents * this.
SDXL_SCALING_FACTOR = 0.13025
LATENT_SPACES = ("diffusion", "vae")


def check_latent_batch(latents: torch.Tensor, *, channels: int, expects: str, rgb_hint: str,
                       check_finite: bool = True, finite_hint: str = "check the sampler or VAE that produced them",
                       vae: str = "sdxl") -> None:
    """What every consumer of a (B, C, H, W) latent batch checks: a floating-point 4-D tensor, B > 0,
    ``channels`` channels of the VAE ``vae`` (``expects`` names who expects them; 3 channels look like pixels:
    ``rgb_hint`` says what to do instead), finite unless ``check_finite`` is off (that check synchronises with
    the device)."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor of shape (B, {channels}, H, W), got {type(latents).__name__}")
    check_has_data(latents, "latents")
    if latents.ndim != 4:
        hint = " Add a batch dimension with latents[None]." if latents.ndim == 3 else ""
        raise ValueError(f"latents must have shape (B, {channels}, H, W), got {tuple(latents.shape)}.{hint}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point (float32/float16/bfloat16), got {latents.dtype}; convert with .float()")
    b, c = latents.shape[:2]
    if b == 0:
        raise ValueError("latents is an empty batch (B=0); pass at least one latent")
    if c != channels:
        if c == 3:
            raise ValueError(f"got 3-channel input {tuple(latents.shape)}: these look like RGB pixel images, but "
                             f"{expects} {channels}-channel latents of the {vae!r} VAE. {rgb_hint}")
        raise ValueError(f"latents have {c} channels, {expects} {channels}-channel latents of the {vae!r} VAE. Latents "
                         f"of another VAE are a different space: score them with a model for that VAE "
                         f"(fastlclip.list_vaes(): {_vae_channels()})")
    if check_finite and not torch.isfinite(latents).all():
        raise ValueError(f"latents contain NaN or Inf; {finite_hint}")


def check_float_tensor(latents) -> None:
    """``latents`` is a floating-point tensor with values (a shape's own checks come after)."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    check_has_data(latents, "latents")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point (float32/float16/bfloat16), got {latents.dtype}; "
                        "convert with .float()")


def check_has_data(t: torch.Tensor, what: str) -> None:
    """``t`` holds values that can be read: a dense tensor on a device with data, not the ``meta`` device
    (shapes only, no values) nor a sparse layout. Checked before anything reads the values."""
    if t.is_meta:
        raise ValueError(f"{what} are on the meta device: a meta tensor has a shape {tuple(t.shape)} but no values "
                         "(made under torch.device('meta') or by an empty-weights loader), so there is nothing to score; "
                         "create or load them on a real device, e.g. torch.randn(..., device='cuda')")
    if t.layout != torch.strided:
        raise ValueError(f"{what} must be a dense tensor, got layout {t.layout}; convert with .to_dense()")


def _vae_channels() -> str:
    return ", ".join(f"{n} {vae_channels(get_vae_config(n))}" for n in list_vaes() if n not in TINY_FAMILY)


def check_latents(latents: torch.Tensor, *, channels: int, size: int, patch: int, resize: str | None = None,
                  check_finite: bool = True, vae: str = "sdxl") -> None:
    """Validate a (B, C, H, W) latent batch for an image tower trained on ``size`` x ``size`` latents,
    under the grid policy ``resize`` (``fastlclip.grids``): None accepts only the trained grid,
    ``"interpolate"`` any grid of whole ``patch`` x ``patch`` patches, ``"pool"`` any grid."""
    check_latent_batch(latents, channels=channels, expects="the model expects",
                       rgb_hint=f"Use model.encode_images(pixels) for RGB in [0, 1], or encode with the {vae!r} VAE first.",
                       check_finite=check_finite, vae=vae)
    h, w = latents.shape[-2:]
    if (h, w) != (size, size):
        if resize is None:
            raise ValueError(
                f"latents are {h}x{w}, this model was trained on {size}x{size} latents ({size * 8}x{size * 8} px "
                f"images). Choose a policy for other sizes with resize= (in encode_latents or fastlclip.load): "
                f"resize='interpolate' resamples the positional embeddings to the latents' patch grid"
                + (f" (needs H and W multiples of the patch size {patch})" if h % patch or w % patch
                   else f" ({h // patch}x{w // patch} patches)")
                + f", resize='pool' centre-crops to a square and area-pools the latents to {size}x{size}"
            )
        if resize == "interpolate" and (h % patch or w % patch):
            raise ValueError(
                f"latents are {h}x{w}, not a whole number of {patch}x{patch} patches: resize='interpolate' needs H and "
                f"W multiples of the patch size {patch}; crop them to {h - h % patch}x{w - w % patch}, or use "
                f"resize='pool' (any size, pooled to {size}x{size})"
            )


def check_pixels(pixels: torch.Tensor) -> None:
    """Validate a (B, 3, H, W) RGB batch in [0, 1]."""
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != 3:
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"pixels must be RGB images of shape (B, 3, H, W) in [0, 1], got {shape}")
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be floating point in [0, 1], got {pixels.dtype}; use images.float() / 255")
    if pixels.shape[0] == 0:
        raise ValueError("pixels is an empty batch (B=0)")
    if pixels.shape[-1] % 8 or pixels.shape[-2] % 8:
        raise ValueError(f"pixel height and width must be multiples of 8 for the SDXL VAE, got {tuple(pixels.shape[-2:])}")
    if not torch.isfinite(pixels).all():
        raise ValueError("pixels contain NaN or Inf")
    lo, hi = pixels.min().item(), pixels.max().item()
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"pixels must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map [-1, 1] images with (x + 1) / 2")


def check_number(value, what: str, *, minimum: float | None = None, positive: bool = False,
                 maximum: float | None = None) -> float:
    """``value`` as a float: a real number (a bool is not one here), finite, ``>= minimum`` (``> 0`` when
    ``positive``) and ``<= maximum`` where given; otherwise a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    bounds = ([f">= {minimum:g}"] if minimum is not None else []) + ([f"<= {maximum:g}"] if maximum is not None else [])
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (positive and value <= 0) \
            or (maximum is not None and value > maximum):
        kind = "a finite positive number" if positive else "a finite number"
        raise ValueError(f"{what} must be {kind}{' ' + ' and '.join(bounds) if bounds else ''}, got {value!r}")
    return value


def check_count(value, what: str, *, minimum: int = 1) -> int:
    """``value``: an int ``>= minimum`` (a bool is not a count); otherwise a TypeError/ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_outputs(values: torch.Tensor, latents: torch.Tensor, what: str) -> torch.Tensor:
    """``values`` (a loss or scores computed from already-checked finite ``latents``) if finite; otherwise a
    ValueError saying the latents overflowed inside the tower, with their magnitude. Synchronises
    with the device (callers run it under their ``check_finite``)."""
    if not torch.isfinite(values.detach()).all():
        peak = latents.detach().abs().amax().item()
        raise ValueError(
            f"the {what} is NaN/Inf although the latents are finite: they overflowed inside the image tower (largest "
            f"|latent| = {peak:.3g}, dtype {latents.dtype}; SDXL latents are of order 1-10). Check the sampler or "
            "scaling that produced them, or their space= (diffusion vs vae)")
    return values


def check_prompt(prompt) -> None:
    """A prompt is a non-empty string: an empty one is a mistake, not the unconditional text."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a non-empty string, got {prompt!r} ({type(prompt).__name__})"
                        + ("; decode bytes with .decode()" if isinstance(prompt, (bytes, bytearray)) else ""))
    if not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")


def prompt_list(prompts: str | Sequence[str], batch: int) -> list[str]:
    """One prompt for the whole batch (a str or a 1-list), or one per latent."""
    if not isinstance(prompts, str) and (isinstance(prompts, (bytes, bytearray, dict))
                                         or not isinstance(prompts, Iterable)):
        raise TypeError(f"prompt must be a string, or a list of strings (1, or one per latent: {batch}), got "
                        f"{prompts!r} ({type(prompts).__name__})")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if len(prompts) not in (1, batch):
        raise ValueError(f"got {len(prompts)} prompts for a batch of {batch} latents; pass 1 or {batch}")
    return prompts


def check_space(space: str) -> None:
    if space not in LATENT_SPACES:
        raise ValueError(
            "space must be 'diffusion' (latents from the pipeline's denoiser: (VAE latents - shift_factor) * "
            f"scaling_factor, e.g. x {SDXL_SCALING_FACTOR} for SDXL) or 'vae' (raw AutoencoderKL.encode(x).latent_dist "
            f"samples), got {space!r}"
        )


def check_noise_level(noise_level, batch: int, *, noise_aware: bool, model: str,
                      check_values: bool = True) -> torch.Tensor | None:
    """A noise level ``s`` (None, a float, or a 0-d / (B,) tensor in [0, 1]) as a (B,) tensor (float32 or wider), or None
    when there is none to apply: None, or zero for a model that is not noise-aware (which refuses any
    other level). ``check_values``: check a tensor's values (NaN, range; synchronises with its device);
    they are always checked for a model that is not noise-aware."""
    if noise_level is None:
        return None
    if isinstance(noise_level, torch.Tensor):
        check_has_data(noise_level, "noise_level values")
        if not noise_level.is_floating_point() or noise_level.ndim > 1:
            raise ValueError(f"noise_level must be a float or a (B,) float tensor, got a {noise_level.dtype} tensor of "
                             f"shape {tuple(noise_level.shape)}")
        if noise_level.ndim == 1 and noise_level.shape[0] != batch:
            raise ValueError(f"noise_level has {noise_level.shape[0]} values for a batch of {batch} latents; pass one "
                             f"float or {batch} values")
        s = noise_level.detach().to(torch.promote_types(noise_level.dtype, torch.float32)).expand(batch)
    elif isinstance(noise_level, (int, float)) and not isinstance(noise_level, bool):
        s = torch.full((batch,), float(noise_level))
    else:
        raise TypeError(f"noise_level must be None, a float or a (B,) tensor in [0, 1], got {type(noise_level).__name__}")
    if check_values or not noise_aware or not isinstance(noise_level, torch.Tensor):
        if not torch.isfinite(s).all():
            raise ValueError("noise_level contains NaN or Inf; pass levels in [0, 1]")
        lo, hi = s.min().item(), s.max().item()
        if lo < 0 or hi > 1:
            raise ValueError(f"noise_level must lie in [0, 1] (0: clean, 1: pure noise), got values in [{lo:.4g}, {hi:.4g}]")
        if not noise_aware:
            if hi > 0:
                raise ValueError(f"model {model!r} is not noise-aware (its vision_cfg has no \"noise_aware\": true): "
                                 "it scores clean latents only; pass noise_level=None, or use a noise-aware model "
                                 "(fastlclip.distill train --noise-aware)")
            return None
    return s


# Prompt length, before tokenising. CLIP reads 77 tokens, 75 of them the text's. The longest token of open_clip's
# BPE vocabulary spells 24 characters ("blackandwhitephotography"), and the tokenizer's cleaning leaves at most one
# space between tokens, so the 75 come from the text's first 75 x 25 = 1,875 characters: a text cut to
# MAX_PROMPT_CHARS (that, and room for a word straddling it) tokenises to the same 77 tokens. (Unless it is
# padded with runs of whitespace or HTML entities, which the cleaning shrinks: then words past the cut are lost.)
# BPE is super-linear in a word's length, so a word is also cut to MAX_WORD_BYTES bytes of UTF-8 (8 or more tokens,
# the longest token being 32 bytes): a one-word megabyte prompt costs what a short one does.
MAX_PROMPT_CHARS = 2048
MAX_WORD_BYTES = 256
# The tokenizer's word cache (word -> its BPE) holds at most this many bytes of words and BPE, least recently used
# out: unique-word prompts would otherwise grow it without bound.
TOKENIZER_CACHE_BYTES = 16 * 2**20
_CACHE_ENTRY_OVERHEAD = 200  # bytes a dict entry and its two str objects cost beyond their characters


class _BoundedCache(dict):
    """open_clip ``SimpleTokenizer.cache`` bounded by bytes, least recently used out (the dict's order, oldest
    first: each eviction is O(1)); its special tokens are kept apart, in ``pinned``, and never evicted."""

    def __init__(self, pinned: dict, max_bytes: int):
        super().__init__()
        self.pinned, self.max_bytes, self.bytes = dict(pinned), max_bytes, 0

    @staticmethod
    def cost(key: str, value: str) -> int:
        return len(key) + len(value) + _CACHE_ENTRY_OVERHEAD

    def __contains__(self, key) -> bool:
        return key in self.pinned or super().__contains__(key)

    def __getitem__(self, key):
        if key in self.pinned:
            return self.pinned[key]
        value = super().pop(key)  # to the end: most recently used
        super().__setitem__(key, value)
        return value

    def __setitem__(self, key, value):
        if super().__contains__(key):
            self.bytes -= self.cost(key, super().pop(key))
        super().__setitem__(key, value)
        self.bytes += self.cost(key, value)
        while self.bytes > self.max_bytes and len(self) > 1:
            oldest = next(iter(self))
            self.bytes -= self.cost(oldest, super().pop(oldest))


@functools.lru_cache(maxsize=None)
def _tokenizer(context_length: int):
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer(context_length=context_length)
    tok.cache = _BoundedCache(tok.cache, TOKENIZER_CACHE_BYTES)
    bpe = tok.bpe
    tok.bpe = lambda word: bpe(word[:MAX_WORD_BYTES])  # a word arrives as one character per UTF-8 byte
    return tok


def cap_prompt(text: str) -> str:
    """``text`` cut to ``MAX_PROMPT_CHARS`` characters: the tokens CLIP reads are all in what is kept."""
    return text[:MAX_PROMPT_CHARS]


def tokenize(texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's BPE tokenisation to (N, context_length) ids; texts that don't fit are truncated with a warning.
    Each text is cut to ``MAX_PROMPT_CHARS`` characters, and each word to ``MAX_WORD_BYTES``, before BPE."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("got an empty list of texts; pass at least one prompt")
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings, got {bad[0]}; pass token ids as a LongTensor instead")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise ValueError(f"text #{empty[0]} is empty ({texts[empty[0]]!r}): an empty prompt is a mistake, not the "
                         "unconditional text; pass a non-empty prompt")
    tok = _tokenizer(context_length)
    capped = [cap_prompt(t) for t in texts]  # before the tokenizer sees them (it is super-linear in a word's length)
    long = [t for t, c in zip(texts, capped) if len(c) < len(t) or len(tok.encode(c)) + 2 > context_length]
    if long:
        warnings.warn(
            f"{len(long)} text(s) exceed {context_length} tokens and were truncated, e.g. {long[0][:60]!r}...",
            stacklevel=3,
        )
    return tok(capped)


def check_tokens(tokens: torch.Tensor, context_length: int, vocab_size: int) -> None:
    if tokens.ndim != 2 or tokens.shape[1] != context_length:
        raise ValueError(f"token ids must have shape (N, {context_length}), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
    if tokens.shape[0] == 0:
        raise ValueError("got an empty batch of token ids")
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{tokens.min().item()}, {tokens.max().item()}]")
    blank = (tokens == 0).all(dim=1)
    if blank.any():
        raise ValueError(f"token row {blank.nonzero()[0].item()} is all zeros (no start- or end-of-text token): that is "
                         "padding, not a prompt; tokenise the text with model.tokenize")
