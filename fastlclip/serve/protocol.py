"""verl-omni's latent protocol v1, as this server reads it: a safetensors body, prompts in its metadata.

A request is ``POST /v1/score`` with the header ``x-drm-protocol-version: 1`` and a body written by
``safetensors.torch.save``: ``latents`` (B, C, H, W) float16/bfloat16/float32 in diffusion space (metadata
``space`` may say ``vae``); the prompts in ``__metadata__`` as ``prompts`` (a JSON list of B strings) or
``prompt`` (one string for all), each cut to ``fastlclip.inputs.MAX_PROMPT_CHARS`` characters (all the tokenizer
reads); optionally ``u`` (the noise level, a scalar, (1,) or (B,) in [0, 1]),
``seeds`` (int64, (1,) or (B,)) and the tensors v1 clients also send (``prompt_embeds``,
``pooled_prompt_embeds``), which are accepted and not used. The body is parsed by the safetensors library
only: nothing is ever unpickled.

Latents are clean; as in v1 (DiNa-LRM's server), a noise-aware model scores them re-noised to ``u``:
``(1 - u) x + u eps`` in diffusion space (rectified flow), ``eps`` standard normal from ``seeds`` (per latent;
seed 0 when none are sent), drawn on the host so every device gets the same noise (:func:`renoise`).

An extension of v1 for the per-channel and packed latent spaces (Qwen-Image, FLUX.2; ``parse(..., space=)``):
``latents`` in diffusion space may be the space's grid ``(B, diffusion_channels, h, w)`` (FLUX.2: 128 channels at
half the VAE latent's side) or, for a packed space, the pipeline's tokens ``(B, L, D)``; the tensors ``height`` and
``width`` (integers: a scalar, (1,) or (B,), all equal: one request is one tensor on one grid) give the VAE latent's
size (image size / VAE factor), needed for tokens of a non-square latent and checked against a grid. ``space:
"vae"`` latents are ``(B, channels, H, W)``. Every form becomes the diffusion grid, through the model's own
``LatentSpace`` (``grid``, ``to_diffusion``); noise is drawn in the grid's shape, so a grid and its tokens score
alike. A server whose model has no diffusion space (FLUX.2 without ``vae_stats``) reads VAE latents only
(``vae_only=``).

An extension of v1 for the video spaces (Wan 2.1 / 2.2, HunyuanVideo (1.5), LTX-Video; ``space.video``):
``latents`` are clips ``(B, C, T, h, w)``, T latent frames, in diffusion space (``space: "vae"``: the VAE's clips,
converted on every frame), or LTX-Video's packed tokens ``(B, T h w, D)`` with the tensor ``frames`` (the clip's
video frame count F, from which ``T = LatentSpace.latent_frames(F)``) and, for a non-square latent, ``height`` /
``width``. ``frames`` (integers: a scalar, (1,) or (B,), all equal), when sent with clips, must give their T (the
space's rule ``F = 1 + (T - 1) * temporal``). Noise (``u``, ``seeds``) is drawn per clip in its ``(C, T, h, w)``
shape. The server's reply keeps ``raw_scores`` (each clip's per-frame cosines pooled by the reward's ``pooling``,
the mean by default) and adds ``frame_scores`` (B lists of T cosines) and ``pooling``.

An extension of v1 for a server of a reward ensemble (``fastlclip.LatentEnsemble``, several heads on one trunk):
the request's metadata may carry ``head_weights``, a JSON object ``{head: weight}`` (:func:`head_weights`: known
heads only, finite numbers >= 0, not all zero; heads not named weigh 0); without it the server's defaults apply.
The reply keeps ``raw_scores`` (then the weighted total per latent, so a v1 client still reads one number per
latent) and adds ``score_kind: "weighted_total"``, ``head_scores`` ``{head: [one per latent]}``, ``head_weights``
(those applied) and ``head_ranges`` ``{head: [lo, hi] or null}`` (a cosine head's range, a logit head's, or null
for a head with no bound, the aesthetic MLP). A single model's replies are v1's, unchanged.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import torch

from .. import inputs
from ..vaes import LatentSpace

PROTOCOL_VERSION = "1"
SCORE_KIND_TOTAL = "weighted_total"  # an ensemble reply's raw_scores: sum_h weight_h * head_scores[h]
LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KNOWN_TENSORS = {"latents", "u", "prompt_embeds", "pooled_prompt_embeds", "seeds", "height", "width", "frames"}


class ProtocolError(ValueError):
    """A request this server refuses (HTTP 400); the message says what is wrong and how to fix it."""


class LatentShapeError(ProtocolError):
    """Latents of a shape the model's latent space does not take (HTTP 400; the server adds the shapes it takes)."""


@dataclass(eq=False)
class ScoreRequest:
    latents: torch.Tensor  # (B, C, h, w) float32 on the host: the diffusion grid (VAE latents on a vae_only server);
    # a video space's clips (B, C, T, h, w)
    prompts: list[str]  # B prompts
    noise_level: float | tuple[float, ...] | None  # u: one value, one per latent, or not sent
    seeds: tuple[int, ...] = (0,)  # one, or one per latent
    head_weights: str | None = None  # metadata 'head_weights' as sent (JSON), checked by head_weights()

    @property
    def size(self) -> int:
        return self.latents.shape[0]


def read_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``safetensors.torch.load`` drops it): an 8-byte little-endian
    header length, then that many bytes of JSON."""
    if len(body) < 8:
        raise ProtocolError(f"the body ({len(body)} bytes) is not a safetensors file; write it with safetensors.torch.save")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise ProtocolError("the body is not a safetensors file (its header length exceeds the body); write it with "
                            "safetensors.torch.save")
    try:
        header = json.loads(body[8:8 + n])
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError("the body is not a safetensors file (its header is not JSON); write it with "
                            "safetensors.torch.save") from None
    except RecursionError:  # a client's input, not a server failure: safetensors headers nest 3 deep
        raise ProtocolError("the body's safetensors header nests JSON too deeply to be a safetensors header; write "
                            "it with safetensors.torch.save") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _prompts(meta: dict[str, str], batch: int) -> list[str]:
    if "prompts" in meta:
        try:
            prompts = json.loads(meta["prompts"])
        except ValueError:
            raise ProtocolError("metadata 'prompts' is not JSON; send a JSON list of strings") from None
        except RecursionError:
            raise ProtocolError("metadata 'prompts' nests JSON too deeply; send a flat JSON list of strings") from None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ProtocolError("metadata 'prompts' must be a JSON list of strings")
    elif "prompt" in meta:
        prompts = [meta["prompt"]]
    else:
        raise ProtocolError("no prompts: put them in the safetensors metadata as 'prompts' (a JSON list, one per latent) "
                            "or 'prompt' (one string for all)")
    # Cut where the tokenizer would (the scores are the same): the text-feature cache's keys stay small.
    prompts = [inputs.cap_prompt(p) for p in prompts]
    if len(prompts) == 1:
        prompts = prompts * batch
    if len(prompts) != batch:
        raise ProtocolError(f"got {len(prompts)} prompts for {batch} latents; send 1 or {batch}")
    if not all(p.strip() for p in prompts):
        raise ProtocolError(f"a prompt is empty (or blank in its first {inputs.MAX_PROMPT_CHARS} characters, all the "
                            "tokenizer reads); every latent needs a non-empty prompt")
    return prompts


def _noise_level(u: torch.Tensor | None, batch: int) -> float | tuple[float, ...] | None:
    if u is None:
        return None
    if not u.is_floating_point() or u.numel() not in (1, batch) or u.ndim > 1:
        raise ProtocolError(f"'u' (the noise level) must be a float scalar, (1,) or ({batch},) tensor, got "
                            f"{u.dtype} {tuple(u.shape)}")
    values = u.double().flatten().tolist()
    if not all(0.0 <= v <= 1.0 for v in values):  # NaN fails too
        raise ProtocolError(f"'u' (the noise level) must lie in [0, 1], got {values[:4]}")
    return values[0] if len(set(values)) == 1 else tuple(values)


def _seeds(seeds: torch.Tensor | None, batch: int) -> tuple[int, ...]:
    if seeds is None:
        return (0,)
    if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool or seeds.ndim > 1 \
            or seeds.numel() not in (1, batch):
        raise ProtocolError(f"'seeds' must be an integer scalar, (1,) or ({batch},) tensor, got {seeds.dtype} "
                            f"{tuple(seeds.shape)}")
    return tuple(int(v) for v in seeds.flatten().tolist())


def head_weights(text: str | None, heads: list[str] | None, defaults: dict[str, float] | None = None
                 ) -> dict[str, float] | None:
    """The head weights a request asks for: metadata ``head_weights`` (``text``, JSON ``{head: weight}``) over the
    server's ``heads`` (None: a single model, which has none), else ``defaults``. Every head gets a weight (0
    where the request names none); raises ProtocolError (HTTP 400) for unknown heads, a weight that is not a finite
    number >= 0, or weights that are all zero."""
    if text is None:
        return defaults
    if heads is None:
        raise ProtocolError("metadata 'head_weights' is for a reward ensemble's server; this server scores one model "
                            "with no heads: send no head_weights")
    try:
        asked = json.loads(text)
    except ValueError:
        raise ProtocolError("metadata 'head_weights' is not JSON; send a JSON object {head: weight}") from None
    except RecursionError:
        raise ProtocolError("metadata 'head_weights' nests JSON too deeply; send a flat JSON object {head: weight}") from None
    if not isinstance(asked, dict) or not asked:
        raise ProtocolError(f"metadata 'head_weights' must be a non-empty JSON object {{head: weight}} over the heads "
                            f"{', '.join(heads)}")
    unknown = [h for h in asked if h not in heads]
    if unknown:
        raise ProtocolError(f"metadata 'head_weights' names unknown heads {[h[:40] for h in unknown[:4]]}; the "
                            f"ensemble's heads: {', '.join(heads)}")
    for h, w in asked.items():
        try:
            ok = not isinstance(w, bool) and isinstance(w, (int, float)) and math.isfinite(float(w)) and w >= 0
        except OverflowError:  # an integer past float range
            ok = False
        if not ok:
            raise ProtocolError(f"metadata 'head_weights'[{h!r}] must be a finite number >= 0, got {str(w)[:40]!r}")
    if not any(asked.values()):
        raise ProtocolError("metadata 'head_weights' are all zero: the total would be 0 whatever the latents; give "
                            "one head a positive weight")
    return {h: float(asked.get(h, 0.0)) for h in heads}


def renoise(request: ScoreRequest) -> torch.Tensor:
    """The request's clean latents re-noised to its ``u``: ``(1 - u) x + u eps``, ``eps`` from its seeds."""
    x = request.latents
    u = request.noise_level
    seeds = request.seeds * x.shape[0] if len(request.seeds) == 1 else request.seeds
    eps = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    u = torch.tensor([u] * x.shape[0] if isinstance(u, float) else u, dtype=x.dtype).view(-1, *[1] * (x.ndim - 1))
    return (1 - u) * x + u * eps


def _size(value: torch.Tensor | None, name: str, batch: int) -> int | None:
    """The VAE latent's ``height`` or ``width`` (or a clip's video ``frames``) a request sends: one positive integer
    for the whole request."""
    if value is None:
        return None
    what = "the clip's video frame count F" if name == "frames" else f"the VAE latent's {name}: image {name} / VAE factor"
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool or value.ndim > 1 \
            or value.numel() not in (1, batch):
        raise ProtocolError(f"'{name}' ({what}) must be an integer scalar, (1,) or ({batch},) tensor, got "
                            f"{value.dtype} {tuple(value.shape)}")
    values = sorted(set(value.flatten().tolist()))
    if len(values) > 1:
        raise ProtocolError(f"'{name}' differs between the latents of one request ({values[:4]}): a request's latents "
                            "are one tensor, scored on one grid; send one request per "
                            + ("clip length" if name == "frames" else "latent size"))
    if values[0] < 1:
        raise ProtocolError(f"'{name}' must be a positive number of " +
                            ("video frames" if name == "frames" else "VAE latent pixels") + f", got {values[0]}")
    return values[0]


def latent_frames(space: LatentSpace, frames: int, sent: int | None = None) -> int:
    """T for ``frames`` video frames in the video ``space``, checked against the clip's ``sent`` T when given;
    ValueError naming the space and its rule otherwise."""
    t = space.latent_frames(frames)
    if sent is not None and sent != t:
        raise ValueError(f"latent space {space.name!r}: 'frames' {frames} video frames are {t} latent frames "
                         f"({space.frame_rule}), the clip has T = {sent}; send the clip's own frame count, or none")
    return t


def accepted_shapes(space: LatentSpace | None, name: str, channels: int, size: int) -> str:
    """What a server on latent space ``name`` takes (``space`` None: VAE latents only), as a sentence for its shape
    errors; shapes for the trained ``size`` x ``size`` VAE latent."""
    if space is not None and space.video:
        out = f"latent space {name!r} takes clips (B, {channels}, T, {size}, {size})"
        if space.pack:
            p = space.pack
            out += (f", the pipeline's packed tokens (B, T * {(size // p) ** 2}, {channels * p * p}) with the tensor "
                    f"'frames' (and 'height' / 'width' for a non-square latent)")
        return (f"{out}, or VAE clips (B, {channels}, T, {size}, {size}) with metadata space 'vae'; 'frames' (the "
                f"video frame count F), when sent, must give T: {space.frame_rule}")
    vae = f"VAE latents (B, {channels}, {size}, {size}) with metadata space 'vae'"
    if space is None:
        return f"latent space {name!r} takes {vae} here (the model has no diffusion space)"
    p = space.patch
    out = f"latent space {name!r} takes diffusion latents (B, {space.diffusion_channels}, {size // p}, {size // p})"
    if space.pack:
        step = space.pack * p
        out += (f", the pipeline's packed tokens (B, {(size // step) ** 2}, {space.diffusion_channels * space.pack ** 2}) "
                f"with tensors 'height' and 'width' the VAE latent's size ({size}, {size}; for a square latent they "
                "may be omitted)")
    return f"{out}, or {vae}"


def parse(body: bytes, *, channels: int, to_diffusion, space: LatentSpace | None = None,
          vae_only: str | None = None) -> ScoreRequest:
    """The request in ``body``, checked: latents (dtype, shape, ``channels``, finite), prompts, noise level and
    seeds; raises ProtocolError (HTTP 400), LatentShapeError for a shape the space does not take (the server adds
    :func:`accepted_shapes`, which names the space). ``channels`` is the VAE's; ``to_diffusion`` maps
    ``space="vae"`` latents to diffusion space (``model.latent_space.to_diffusion``).
    ``space`` (the model's ``LatentSpace``) also takes its grid of ``diffusion_channels`` and a packed space's
    tokens with ``height`` / ``width``, each made the diffusion grid by ``space.grid``; ``vae_only`` (a reason): the
    server has no diffusion space, refuses diffusion latents with that reason and keeps VAE latents as they are. A
    video ``space`` takes clips (B, C, T, h, w), or its packed tokens with ``frames`` (the video extension). The
    latent grid's size is the model's to check."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    meta = read_metadata(body)
    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ProtocolError(f"the body is not a valid safetensors file ({str(e).splitlines()[0][:200]}); write it with "
                            "safetensors.torch.save") from None
    except KeyError as e:  # a dtype the safetensors format has and its torch loader does not map (F8_E8M0, ...)
        raise ProtocolError(f"a tensor has safetensors dtype {str(e.args[0] if e.args else e)[:40]!r}, which this "
                            "server does not read; send 'latents' as float16, bfloat16 or float32 (safetensors F16, "
                            "BF16, F32)") from None
    unknown = sorted(set(tensors) - KNOWN_TENSORS)
    if unknown:
        raise ProtocolError(f"unknown tensors {unknown}; protocol v1 sends {sorted(KNOWN_TENSORS)}")
    latents = tensors.get("latents")
    if latents is None:
        raise ProtocolError("the body has no 'latents' tensor")
    if latents.dtype not in LATENT_DTYPES:
        raise ProtocolError(f"'latents' must be float16, bfloat16 or float32, got {latents.dtype}")
    kind = meta.get("space", "diffusion")
    if kind not in ("diffusion", "vae"):
        raise ProtocolError(f"metadata 'space' must be 'diffusion' or 'vae', got {kind[:40]!r}")
    if kind == "diffusion" and vae_only is not None:
        raise LatentShapeError(vae_only)
    if space is not None and space.video:
        latents = _clips(latents, tensors, kind, space, to_diffusion)
    else:
        latents = _grid(latents, tensors, kind, space, channels, to_diffusion, vae_only)
    batch = latents.shape[0]
    weights = meta.get("head_weights")
    return ScoreRequest(latents, _prompts(meta, batch), _noise_level(tensors.get("u"), batch),
                        _seeds(tensors.get("seeds"), batch), weights if isinstance(weights, str) else None)


def _grid(latents: torch.Tensor, tensors: dict, kind: str, space: LatentSpace | None, channels: int, to_diffusion,
          vae_only: str | None) -> torch.Tensor:
    """An image space's request latents -> the diffusion grid (B, C, h, w) float32 (VAE latents on a ``vae_only``
    server): the grid, a packed space's tokens with 'height' / 'width', or VAE latents, checked."""
    if "frames" in tensors:
        name = f"latent space {space.name!r}" if space is not None else "this server's latent space"
        raise ProtocolError(f"'frames' (a clip's video frame count) is for the video spaces; {name} is an image "
                            "space: send no 'frames'")
    grid_channels = space.diffusion_channels if space is not None and kind == "diffusion" else channels
    packed = space is not None and space.pack and kind == "diffusion"
    if latents.ndim not in ((3, 4) if packed else (4,)) or latents.shape[0] == 0:
        raise LatentShapeError(f"'latents' must have shape (B, {grid_channels}, H, W)"
                               + (" or (B, L, D) packed tokens" if packed else "")
                               + f" with B > 0, got {tuple(latents.shape)}")
    if latents.ndim == 4 and latents.shape[1] != grid_channels:
        raise LatentShapeError(f"'latents' have {latents.shape[1]} channels, the model takes {grid_channels}"
                               + (" in VAE space" if kind == "vae" and space is not None and space.per_channel else ""))
    latents = latents.float()
    if not torch.isfinite(latents).all():
        raise ProtocolError("'latents' contain NaN or Inf; check the sampler that produced them")
    batch = latents.shape[0]
    height, width = _size(tensors.get("height"), "height", batch), _size(tensors.get("width"), "width", batch)
    if (height is None) != (width is None):
        raise ProtocolError("'height' and 'width' go together (the VAE latent's size): send both, or neither")
    if latents.ndim == 3:
        try:
            latents = space.grid(latents, height, width)
        except ValueError as e:
            raise LatentShapeError(str(e)) from None
    else:
        step = space.patch if space is not None and kind == "diffusion" else 1
        sent = (latents.shape[2] * step, latents.shape[3] * step)
        if (height, width) != (None, None) and (height, width) != sent:
            raise LatentShapeError(f"'height' / 'width' say a {height} x {width} VAE latent, the 'latents' "
                                   f"grid {tuple(latents.shape)} is a {sent[0]} x {sent[1]} one; send both right, or "
                                   "neither with a grid")
        if kind == "vae" and vae_only is None:
            p = space.patch if space is not None else 1
            if sent[0] % p or sent[1] % p:
                raise LatentShapeError(f"VAE latents of {sent[0]} x {sent[1]} are not a whole number of "
                                       f"{p} x {p} patches: the diffusion grid patchifies them")
            latents = to_diffusion(latents)
    return latents


def _clips(latents: torch.Tensor, tensors: dict, kind: str, space: LatentSpace, to_diffusion) -> torch.Tensor:
    """A video space's request latents -> diffusion-space clips (B, C, T, h, w) float32: clips, or the pipeline's
    packed tokens with 'frames' (and 'height' / 'width'), checked."""
    c, packed = space.channels, bool(space.pack) and kind == "diffusion"
    if latents.ndim not in ((3, 5) if packed else (5,)) or latents.shape[0] == 0:
        raise LatentShapeError(f"'latents' must be clips (B, {c}, T, h, w)"
                               + (" or (B, L, D) packed tokens with 'frames'" if packed else "")
                               + f" with B > 0, got {tuple(latents.shape)}"
                               + ("; one frame is latents[:, :, None]" if latents.ndim == 4 else ""))
    if latents.ndim == 5 and latents.shape[1] != c:
        raise LatentShapeError(f"'latents' have {latents.shape[1]} channels, the model takes {c}"
                               + (" in VAE space" if kind == "vae" else ""))
    latents = latents.float()
    if not torch.isfinite(latents).all():
        raise ProtocolError("'latents' contain NaN or Inf; check the sampler that produced them")
    batch = latents.shape[0]
    height, width = _size(tensors.get("height"), "height", batch), _size(tensors.get("width"), "width", batch)
    try:
        frames = _size(tensors.get("frames"), "frames", batch)
    except ProtocolError as e:  # clips of several lengths in one request: answered with the shapes the space takes
        raise LatentShapeError(str(e)) from None
    if (height is None) != (width is None):
        raise ProtocolError("'height' and 'width' go together (the VAE latent's size): send both, or neither")
    try:
        if latents.ndim == 3:
            if frames is None:
                raise ValueError(f"latent space {space.name!r}: packed video tokens need the tensor 'frames' (the "
                                 f"clip's video frame count F; {space.frame_rule})")
            return space.grid(latents, height, width, latent_frames=latent_frames(space, frames))
        if frames is not None:
            latent_frames(space, frames, latents.shape[2])
    except ValueError as e:
        raise LatentShapeError(str(e)) from None
    if (height, width) != (None, None) and (height, width) != tuple(latents.shape[3:]):
        raise LatentShapeError(f"'height' / 'width' say a {height} x {width} VAE latent, the clips "
                               f"{tuple(latents.shape)} are {latents.shape[3]} x {latents.shape[4]}; send both right, "
                               "or neither with clips")
    return to_diffusion(latents) if kind == "vae" else latents
