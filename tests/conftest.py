"""Shared fixtures: tiny Latent-CLIP configs and checkpoints in the official formats."""

import os
import warnings

import numpy as np
import pytest
import torch

# Triton reads TRITON_INTERPRET when kernels are decorated: set it before anything imports fastlclip.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `make test` runs one pytest-xdist worker per core: each worker's torch keeps to one thread, so two workers on
# two cores do not fight over four.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# fp32 references are true fp32: TF32 is cuDNN's default for convolutions (a patchify conv's error is
# ~1e-3, above the 1e-4 the fp32 comparisons allow) and optional for matmuls. Off for every test.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

TINY_VAE = {
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 8,
    "block_out_channels": [8, 8, 8, 8], "act_fn": "silu", "scaling_factor": 0.13025,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# 16x16 latents (128 px), patch 4 -> 16 tokens + class token; vision and text: 2 heads of width 32.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 128, "layers": 2, "width": 64, "head_width": 32, "patch_size": 4,
                   "latent_factor": 8, "latent_n_channels": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    "vae_cfg": TINY_VAE,
}


def tiny_open_clip(seed: int = 0):
    """A one-layer open_clip CLIP at 32 px: the pixel (decode-then-CLIP) reward's CLIP in tests."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    ).eval()


def tiny_noise_aware(seed: int = 0):
    """The tiny config as a noise-aware tower, random weights from ``seed``; its noise embedding (zero at
    initialisation, so the level would not matter) drawn from N(0, 0.5^2)."""
    import fastlclip

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fastlclip.load({**TINY, "vision_cfg": {**TINY["vision_cfg"], "noise_aware": True}})
    with torch.no_grad():
        for p in model.visual.latent_vit.noise_embed.parameters():
            p.normal_(0, 0.5)
    return model


def tiny_model_with_trained_scale():
    """The tiny config, random weights, with a trained CLIP's logit scale (100, as the released checkpoints)."""
    import math
    import warnings

    import fastlclip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = fastlclip.load(TINY)
    with torch.no_grad():
        m.logit_scale.fill_(math.log(100.0))
    return m


def open_clip_reference(seed: int = 0):
    """An open_clip CLIP with its conv1 swapped for a 4-channel conv: the independent reference."""
    import open_clip

    torch.manual_seed(seed)
    v = TINY["vision_cfg"]
    latent = v["image_size"] // v["latent_factor"]
    ref = open_clip.model.CLIP(
        embed_dim=TINY["embed_dim"],
        vision_cfg={"image_size": latent, "patch_size": v["patch_size"], "width": v["width"],
                    "layers": v["layers"], "head_width": v["head_width"]},
        text_cfg=TINY["text_cfg"],
    )
    ref.visual.conv1 = torch.nn.Conv2d(4, v["width"], v["patch_size"], v["patch_size"], bias=False)
    with torch.no_grad():  # non-trivial values everywhere (open_clip zero-inits some biases)
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref.eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE).eval()


def official_state(ref, vae=None) -> dict:
    """The reference's weights in the authors' training-checkpoint layout."""
    sd = {}
    for k, v in ref.state_dict().items():
        k = "visual.latent_vit." + k[len("visual."):] if k.startswith("visual.") else k
        sd["module." + k] = v.clone()
    if vae is not None:
        for k, v in vae.encoder.state_dict().items():
            sd["module.visual.vae_encoder." + k] = v.clone()
        for k, v in vae.quant_conv.state_dict().items():
            sd["module.visual.vae_quant_conv." + k] = v.clone()
    return {
        "epoch": 34,
        "name": "latent-clip-run",
        "state_dict": sd,
        "optimizer": {"state": {0: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros(3)}},
                      "param_groups": [{"lr": np.float64(5e-4), "betas": (0.9, 0.98), "eps": 1e-6, "params": [0]}]},
        "best_loss": np.float32(1.25),
    }


@pytest.fixture
def reference():
    return open_clip_reference()


@pytest.fixture
def official_ckpt(tmp_path, reference):
    path = tmp_path / "epoch_34.pt"
    torch.save(official_state(reference, tiny_vae()), path)
    return path


@pytest.fixture
def tiny_model():
    import fastlclip

    with pytest.warns(UserWarning, match="random"):
        return fastlclip.load(TINY)


@pytest.fixture(scope="module")
def seeded_tiny_model():
    """One random-weights tiny Latent-CLIP per test module, the same weights every run (seed 0)."""
    import fastlclip

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastlclip.load(TINY)


@pytest.fixture
def kernel_calls(monkeypatch) -> dict:
    """Calls of fastlclip.kernels' fused attention and patch embedding, counted (each still runs). The fused and
    PyTorch paths give equal values, so only the calls tell which one a backend took."""
    from fastlclip.kernels import flash_attention, fused_patch_embed

    calls = {"attention": 0, "patch_embed": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(flash_attention, "attention_packed", counted("attention", flash_attention.attention_packed))
    monkeypatch.setattr(fused_patch_embed, "patch_embed", counted("patch_embed", fused_patch_embed.patch_embed))
    return calls


def record_engines(monkeypatch, module) -> list[dict]:
    """``module``'s ``run_local`` and ``run_ray`` (fastlclip.corpus's, or a user of the corpus engines) replaced by
    recorders of what they are handed, outside torchrun (no RANK / WORLD_SIZE); returns the calls, in order."""
    calls = []

    def recorder(engine):
        def run(mine, spec, opts, workers, report, **kw):
            calls.append(dict(engine=engine, mine=list(mine), spec=spec, opts=opts, workers=workers, report=report,
                              kw=kw))
            return []
        return run

    monkeypatch.setattr(module, "run_local", recorder("local"))
    monkeypatch.setattr(module, "run_ray", recorder("ray"))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return calls


@pytest.fixture(autouse=True)
def _restore_model_registry():
    """Configs a test registers with fastlclip.add_model_config don't leak into other tests."""
    from fastlclip import model_configs

    saved = dict(model_configs._REGISTRY)
    yield
    model_configs._REGISTRY.clear()
    model_configs._REGISTRY.update(saved)


_COMPILE_FOR_GPU = """
import contextlib
import importlib
import io
import json
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module = importlib.import_module({module!r})
shared = []
for name, pointers, floats, constexprs, options in {cases!r}:
    kernel = getattr(module, name)
    signature = {{a: "constexpr" if a in constexprs else "*" + pointers[a] if a in pointers
                 else "fp32" if a in floats else "i32" for a in kernel.arg_names}}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report is printed
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", {arch}, 32), options=options)
    spills = [int(n) for n in re.findall(r"(\\d+) bytes spill stores", log.getvalue())]
    shared.append(dict(shared=compiled.metadata.shared, spill_stores=spills[0] if spills else None))
print(json.dumps(shared))
"""


def compile_kernels_for_gpu(module: str, cases: list, arch: int = 90) -> list[int]:
    """Compile kernels of ``module`` with Triton's real compiler for ``sm_<arch>``, in a process without the
    interpreter; returns each kernel's shared memory in bytes.

    ``cases``: (kernel name, {pointer arg: dtype}, (fp32 scalar args), {constexpr: value}, {num_warps,
    num_stages}); other args are i32. The interpreter checks less than the compiler: this catches what only
    the compiler rejects, and what a kernel needs of an architecture's shared memory.
    """
    return [r["shared"] for r in compile_report_for_gpu(module, cases, arch, spills=False)]


def compile_report_for_gpu(module: str, cases: list, arch: int = 90, spills: bool = True) -> list[dict]:
    """As :func:`compile_kernels_for_gpu`, each kernel's ``{"shared": bytes, "spill_stores": bytes}``; the spill
    bytes are ptxas's own report (None when ``spills`` is False: a cached kernel has no report, and reading it
    means compiling again)."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if spills:
        env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    code = _COMPILE_FOR_GPU.format(module=module, cases=cases, arch=arch)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def kernel_device() -> str:
    """Where the kernel tests run: "cpu" under the interpreter, else "cuda"; skips the module otherwise."""
    from fastlclip.kernels import launch

    if launch.INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("fastlclip.kernels was imported without TRITON_INTERPRET=1 and there is no CUDA device",
                allow_module_level=True)


# Per-row tolerances against float64, as the CPU kernel tests use them (bf16 keeps 8 significant bits).
ROW_TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float) -> None:
    """Every row (last dimension) of ``got`` against the float64 ``want``: max |got - want| over the row, relative
    to max(1, the row's max |want|), below ``tol``. One cosine over a flattened tensor hides a wrong scale and a
    single wrong row among thousands; this does not."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    got, want = got.detach().double().flatten(0, -2), want.detach().double().flatten(0, -2)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs().amax(dim=-1) / want.abs().amax(dim=-1).clamp_min(1.0)
    worst = int(err.argmax())
    assert err[worst] < tol, (f"{what}: row {worst} of {len(err)} off by {err[worst].item():.3g} (relative, tolerance "
                              f"{tol}); {int((err >= tol).sum())} rows over")


def gpu_benchmark(benchmark, fn, calls: int = 20) -> None:
    """pytest-benchmark on CUDA: one untimed call (capture, compile, autotune), then 30 rounds of ``calls``
    back-to-back calls closed by one synchronize, so launch overlap counts as it does in a real loop."""
    def rounds():
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()

    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["calls_per_round"] = calls
    benchmark.pedantic(rounds, rounds=30, warmup_rounds=2, iterations=1)
