"""A latent reward ensemble (issue 32, part 4): one latent image trunk, a linear head per CLIP teacher, each
teacher's text tower and logit scale, and head teachers (the aesthetic MLP) on a CLIP head's prediction.

    model = fastlclip.load(None, "ensemble.safetensors")      # a LatentEnsemble
    embs = model.encode_latents(latents)                     # {head: (B, D_head)}, one trunk forward
    reward = fastlclip.RewardEnsemble(model, weights={"hps": 5.0, "pick": 0.05})

The file is a safetensors file (nothing is unpickled). Its tensors:

- ``trunk.<name>``: the trunk's image tower (a fastlclip ``LatentViT``: ``trunk.visual.latent_vit.*``);
- ``proj.<head>.weight``: (D_head, D_trunk), the linear projection of a CLIP head;
- ``text.<head>.<name>``: the head's text tower, open_clip ``TextTransformer`` names for an ``open_clip``
  teacher, transformers ``CLIPTextModelWithProjection`` names (``text_model.*``, ``text_projection.weight``)
  for an ``hf`` teacher;
- ``logit_scale.<head>``: the teacher's ``logit_scale`` (log space, as the teacher stores it);
- ``mlp.<head>.layers.*``: a head teacher's MLP (the LAION aesthetic MLP's names).

Its metadata ``fastlclip_ensemble`` is JSON: ``format`` (1), ``trunk`` (the trunk's fastlclip config, with its
``vae`` / ``vae_cfg``: the latent space), ``heads`` (in order; each ``name``, ``kind``, ``embed_dim``,
``base``, ``reward`` = ``{form, constant, scale, preset}``, and ``text``: ``{"type": "open_clip",
"embed_dim", "text_cfg", "quick_gelu"}`` or ``{"type": "hf", "config": CLIPTextConfig dict,
"projection_dim"}``, or ``mlp_sizes`` for a head teacher) and ``info`` (what trained it).

Every text tower is tokenised with open_clip's bundled CLIP BPE (``fastlclip.inputs.tokenize``, at the tower's
context length): the vocabulary of OpenAI CLIP, which transformers' ``CLIPTokenizer`` of OpenAI, laion and
PickScore checkpoints also uses. For an ``hf`` tower the ids up to the end-of-text token are the same as
``CLIPTokenizer``'s (``<|startoftext|>`` 49406, the BPE, ``<|endoftext|>`` 49407; truncated to 77 keeping the
end token); the padding differs (0 here, the tokenizer's pad token there), but the tower is causal and pools
the end token, which never attends to what follows it, so the embedding is the same.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .model import LatentCLIP
from .model_configs import ModelConfig

ENSEMBLE_META_KEY = "fastlclip_ensemble"
FORMAT = 1
# The trunk is a LatentCLIP whose text tower is never used: the smallest one the config accepts.
_NO_TEXT = {"context_length": 1, "vocab_size": 1, "width": 8, "heads": 1, "layers": 1}


def trunk_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The trunk's config: ``cfg`` with a placeholder text tower (the heads carry the teachers')."""
    out = copy.deepcopy(dict(cfg))
    out["text_cfg"] = dict(_NO_TEXT)
    return out


# -- text towers -------------------------------------------------------------------------------------
class OpenCLIPText(nn.Module):
    """An open_clip text tower (``TextTransformer``), rebuilt from ``text_cfg``."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__()
        from open_clip.model import CLIPTextCfg, _build_text_tower

        self.spec = dict(spec)
        self.tower = _build_text_tower(int(spec["embed_dim"]), CLIPTextCfg(**spec["text_cfg"]),
                                       quick_gelu=bool(spec.get("quick_gelu", False)))
        self.context_length = int(spec["text_cfg"].get("context_length", 77))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower(tokens)


class HFText(nn.Module):
    """A transformers ``CLIPTextModelWithProjection``, rebuilt from its config."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        self.spec = dict(spec)
        config = CLIPTextConfig(**{**spec["config"], "projection_dim": int(spec["projection_dim"])})
        self.tower = CLIPTextModelWithProjection(config)
        self.context_length = min(77, int(config.max_position_embeddings))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tower(input_ids=tokens).text_embeds


def build_text(spec: Mapping[str, Any]) -> nn.Module:
    if spec.get("type") == "open_clip":
        return OpenCLIPText(spec)
    if spec.get("type") == "hf":
        return HFText(spec)
    raise ValueError(f"text tower type {spec.get('type')!r}: open_clip or hf")


_OC_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


def text_of_teacher(teacher) -> tuple[dict, dict[str, torch.Tensor]]:
    """(text spec, text tower state dict) of a built CLIP teacher (``fastlclip.distill.teachers``)."""
    model = teacher.model
    if teacher.kind == "hf":
        tc = model.config.text_config.to_dict()
        keep = {k: v for k, v in tc.items() if k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "attention_dropout", "initializer_range",
            "initializer_factor", "pad_token_id", "bos_token_id", "eos_token_id")}
        spec = {"type": "hf", "config": keep, "projection_dim": int(model.config.projection_dim)}
        sd = {k: v for k, v in model.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    elif teacher.kind == "open_clip":
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import QuickGELU

        tok = getattr(teacher, "tokenizer", None)
        if tok is not None and not isinstance(tok, SimpleTokenizer):
            raise ValueError(f"teacher {teacher.name!r}: its tokenizer is {type(tok).__name__}; an ensemble carries "
                             "open_clip's CLIP BPE tokenizer only")
        if not hasattr(model, "token_embedding"):
            raise ValueError(f"teacher {teacher.name!r}: its text tower is not open_clip's built-in transformer")
        blocks = model.transformer.resblocks
        width = model.token_embedding.embedding_dim
        text_cfg = {"context_length": int(model.positional_embedding.shape[0]),
                    "vocab_size": int(model.token_embedding.num_embeddings), "width": int(width),
                    "heads": int(blocks[0].attn.num_heads), "layers": len(blocks),
                    "mlp_ratio": blocks[0].mlp.c_fc.out_features / width,
                    "pool_type": getattr(model, "text_pool_type", "argmax")}
        spec = {"type": "open_clip", "embed_dim": int(model.text_projection.shape[1]), "text_cfg": text_cfg,
                "quick_gelu": any(isinstance(m, QuickGELU) for m in model.transformer.modules())}
        sd = {k: v for k, v in model.state_dict().items() if k.startswith(_OC_TEXT)}
    else:
        raise ValueError(f"teacher {teacher.name!r} ({teacher.kind}) has no text tower")
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
    own = build_text(spec).tower.state_dict()
    own = {k: v for k, v in own.items() if not k.endswith("position_ids") and k != "attn_mask"}
    if set(own) != set(sd) or any(own[k].shape != sd[k].shape for k in own):
        diff = sorted(set(own) ^ set(sd)) or [k for k in own if own[k].shape != sd[k].shape]
        raise ValueError(f"teacher {teacher.name!r}: its text tower does not rebuild from its config "
                         f"({diff[:4]} differ); an ensemble can't carry it")
    return spec, sd


# -- the model ---------------------------------------------------------------------------------------
class LatentEnsemble(nn.Module):
    """One latent trunk, named heads. ``heads``: dicts with ``name``, ``kind`` (``open_clip`` / ``hf``: a CLIP
    head with a projection and a text tower; ``aesthetic``: an MLP on its ``base``'s prediction), ``embed_dim``,
    ``base``, ``reward`` (a ``RewardForm`` dict), ``text`` (a CLIP head's text spec) or ``mlp_sizes``."""

    def __init__(self, trunk_cfg: Mapping[str, Any], heads: Sequence[Mapping[str, Any]], info: Mapping | None = None):
        super().__init__()
        from .distill.teachers import AestheticMLP, RewardForm

        self.trunk_cfg = trunk_config(trunk_cfg)
        self.trunk = LatentCLIP(ModelConfig.from_dict(self.trunk_cfg, name="ensemble-trunk"))
        self.trunk.requires_grad_(False)
        self.heads = [json.loads(json.dumps(dict(h))) for h in heads]
        self.info = dict(info or {})
        names = [h["name"] for h in self.heads]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"an ensemble names one head or more, uniquely: got {names}")
        self.forms = {h["name"]: RewardForm(**h["reward"]) for h in self.heads}
        d = self.trunk.cfg.embed_dim
        self.proj, self.text, self.mlp = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self.logit_scale = nn.ParameterDict()
        for h in self.heads:
            if h.get("base") is None:
                self.proj[h["name"]] = nn.Linear(d, int(h["embed_dim"]), bias=False)
                self.text[h["name"]] = build_text(h["text"])
                self.logit_scale[h["name"]] = nn.Parameter(torch.tensor(0.0), requires_grad=False)
            else:
                if h["base"] not in names or any(b["name"] == h["base"] and b.get("base") for b in self.heads):
                    raise ValueError(f"head {h['name']!r}: its base {h['base']!r} is not a CLIP head of the ensemble")
                self.mlp[h["name"]] = AestheticMLP(h["mlp_sizes"])
        self.text.requires_grad_(False)
        self.mlp.requires_grad_(False).eval()

    @classmethod
    def load(cls, path: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> "LatentEnsemble":
        """The ensemble saved at ``path`` (``fastlclip.load(None, path)`` gives the same)."""
        return load_ensemble(path, device=device, dtype=dtype)

    # -- properties
    @property
    def head_names(self) -> list[str]:
        return [h["name"] for h in self.heads]

    @property
    def clip_heads(self) -> list[str]:
        return [h["name"] for h in self.heads if h.get("base") is None]

    def head(self, name: str) -> dict:
        for h in self.heads:
            if h["name"] == name:
                return h
        raise KeyError(f"unknown head {name!r}; the ensemble's heads: {', '.join(self.head_names)}")

    @property
    def device(self) -> torch.device:
        return self.trunk.device

    @property
    def latent_space(self):
        return self.trunk.latent_space

    @property
    def noise_aware(self) -> bool:
        return self.trunk.noise_aware

    # -- image side
    def trunk_features(self, latents: torch.Tensor, *, space: str = "diffusion", noise_level=None,
                       resize=None, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """The trunk's (B, D_trunk) features, unnormalised: the one image-tower forward of a call. ``height`` /
        ``width``: a packed space's VAE latent size (``LatentCLIP.encode_latents``)."""
        kw = {} if resize is None else {"resize": resize}
        return self.trunk.encode_latents(latents, space=space, normalize=False, noise_level=noise_level,
                                         height=height, width=width, **kw)

    def project(self, feats: torch.Tensor, normalize: bool = True) -> dict[str, torch.Tensor]:
        out = {n: self.proj[n](feats.to(self.proj[n].weight.dtype)) for n in self.clip_heads}
        return {n: F.normalize(v, dim=-1) for n, v in out.items()} if normalize else out

    def encode_latents(self, latents: torch.Tensor, *, space: str = "diffusion", normalize: bool = True,
                       noise_level=None, resize=None, height: int | None = None,
                       width: int | None = None) -> dict[str, torch.Tensor]:
        """Each CLIP head's (B, D_head) embedding, from one trunk forward (``LatentCLIP.encode_latents``'s
        arguments: any registered latent space, a packed space's tokens with ``height`` / ``width``)."""
        feats = self.trunk_features(latents, space=space, noise_level=noise_level, resize=resize, height=height,
                                    width=width)
        return self.project(feats, normalize)

    # -- text side
    def encode_text(self, texts: str | Sequence[str], head: str, normalize: bool = True) -> torch.Tensor:
        """A CLIP head's text tower on ``texts`` (open_clip's CLIP BPE at the tower's context length)."""
        if head not in self.text:
            self.head(head)
            raise ValueError(f"head {head!r} is a head on {self.head(head)['base']!r}'s prediction; it has no text tower")
        tower = self.text[head]
        tokens = inputs.tokenize(texts, tower.context_length).to(self.device)
        out = tower(tokens).float()
        return F.normalize(out, dim=-1) if normalize else out

    # -- rewards
    def value(self, name: str, embs: Mapping[str, torch.Tensor], txt: torch.Tensor | None = None) -> torch.Tensor:
        """The (B,) value of head ``name`` (cos, logit_scale.exp() * cos, or the MLP) on normalised embeddings;
        (B, T), one per latent frame, for a video space's clips (embeddings (B, T, D), ``txt`` one row per clip)."""
        h, form = self.head(name), self.forms[name]
        if h.get("base") is not None:
            mlp = self.mlp[name]
            w = mlp.layers[0].weight
            return mlp(F.normalize(embs[h["base"]].float(), dim=-1).to(w.dtype)).float().squeeze(-1)
        if txt is None:
            raise ValueError(f"head {name!r} scores an image against a prompt: pass its text features")
        emb = embs[name]
        if emb.ndim == 3:  # per latent frame: each clip's text row against all its frames
            txt = txt[:, None]
        cos = (emb.float() * txt.float()).sum(-1)
        if form.form == "logit":
            return self.logit_scale[name].float().exp() * cos
        return cos

    def reward(self, name, embs, txt=None) -> torch.Tensor:
        """ReNO's loss, per sample: ``constant - value``."""
        return self.forms[name].constant - self.value(name, embs, txt)

    def score(self, name, embs, txt=None) -> torch.Tensor:
        """The teacher's own scale (times its score scaling), per sample."""
        return self.forms[name].scale * self.value(name, embs, txt)

    # -- files
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"trunk.{k}": v for k, v in self.trunk.state_dict().items() if k.startswith("visual.latent_vit.")}
        for n in self.clip_heads:
            out[f"proj.{n}.weight"] = self.proj[n].weight
            for k, v in self.text[n].tower.state_dict().items():
                if not k.endswith("position_ids") and k != "attn_mask":
                    out[f"text.{n}.{k}"] = v
            out[f"logit_scale.{n}"] = self.logit_scale[n]
        for n, m in self.mlp.items():
            out.update({f"mlp.{n}.{k}": v for k, v in m.state_dict().items()})
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, str]:
        return {ENSEMBLE_META_KEY: json.dumps({"format": FORMAT, "trunk": self.trunk_cfg, "heads": self.heads,
                                               "info": self.info})}

    def load_tensors(self, sd: Mapping[str, torch.Tensor], where: str = "the ensemble") -> None:
        want = self.tensors()
        missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        if missing or extra:
            raise ValueError(f"{where}: its tensors are not this ensemble's (missing {missing[:4]}, unexpected "
                             f"{extra[:4]})")
        bad = [k for k in want if tuple(sd[k].shape) != tuple(want[k].shape)]
        if bad:
            raise ValueError(f"{where}: {bad[0]} is {tuple(sd[bad[0]].shape)}, the ensemble's {tuple(want[bad[0]].shape)}")
        with torch.no_grad():
            trunk = self.trunk.state_dict()
            for k, v in sd.items():
                part, _, rest = k.partition(".")
                if part == "trunk":
                    trunk[rest].copy_(v)
                elif part == "proj":
                    self.proj[rest.split(".")[0]].weight.copy_(v)
                elif part == "text":
                    n, _, key = rest.partition(".")
                    self.text[n].tower.state_dict()[key].copy_(v)
                elif part == "logit_scale":
                    self.logit_scale[rest].copy_(v)
                else:
                    n, _, key = rest.partition(".")
                    self.mlp[n].state_dict()[key].copy_(v)


def save_ensemble(model: LatentEnsemble, path: str | os.PathLike) -> Path:
    """Write ``model`` to a safetensors file (durably: written aside, fsynced, renamed)."""
    from safetensors.torch import save_file

    from .distill.train import replace_durably

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(model.tensors(), str(tmp), metadata=model.metadata())
    replace_durably(tmp, path)
    return path


def ensemble_metadata(path: str | os.PathLike) -> dict | None:
    """The ensemble metadata of a safetensors file, or None when it is not an ensemble file."""
    from safetensors import safe_open

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # not a safetensors file: the ordinary loader names the problem
        return None
    if ENSEMBLE_META_KEY not in meta:
        return None
    from .vaes import read_json

    try:
        info = read_json(meta[ENSEMBLE_META_KEY], "the ensemble metadata")
    except ValueError as e:
        raise ValueError(f"{p.name}: its ensemble metadata is not JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("heads"), list) \
            or not isinstance(info.get("trunk"), dict):
        raise ValueError(f"{p.name}: its ensemble metadata is not fastlclip's format {FORMAT} (format, trunk, heads)")
    return info


def load_ensemble(path: str | os.PathLike, *, device="cpu", dtype=torch.float32) -> LatentEnsemble:
    """The ensemble saved at ``path``, from the file alone (no other file, no download)."""
    from safetensors.torch import load_file

    info = ensemble_metadata(path)
    if info is None:
        raise ValueError(f"{Path(path).name} is not a fastlclip ensemble file (no {ENSEMBLE_META_KEY} metadata): "
                         "load a single Latent-CLIP with fastlclip.load(None, path)")
    where = Path(path).name
    try:
        model = LatentEnsemble(info["trunk"], info["heads"], info.get("info"))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: its ensemble metadata does not describe an ensemble ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    model.load_tensors(load_file(str(path)), where)
    return model.to(device=torch.device(device), dtype=dtype).eval()


def from_teachers(trunk_cfg: Mapping[str, Any], built: Mapping[str, Any], info: Mapping | None = None
                  ) -> LatentEnsemble:
    """An ensemble for a built teacher set (``fastlclip.distill.teachers.build_teachers``): each CLIP teacher's
    text tower and logit scale copied in, each head teacher's MLP; trunk and projections as initialised."""
    heads, texts = [], {}
    for name, t in built.items():
        h = {"name": name, "kind": t.kind, "embed_dim": int(t.embed_dim), "base": t.base,
             "reward": t.reward_form.as_dict()}
        if t.base is None:
            h["text"], texts[name] = text_of_teacher(t)
        else:
            h["mlp_sizes"] = [t.head.layers[i].in_features for i in (0, 2, 4, 6, 7)] + [1]
        heads.append(h)
    model = LatentEnsemble(trunk_cfg, heads, info)
    with torch.no_grad():
        for name, t in built.items():
            if t.base is None:
                for k, v in texts[name].items():
                    model.text[name].tower.state_dict()[k].copy_(v)
                model.logit_scale[name].copy_(t.model.logit_scale.detach().float().cpu().reshape(()))
            else:
                model.mlp[name].load_state_dict({k: v.float().cpu() for k, v in t.head.state_dict().items()})
    return model
