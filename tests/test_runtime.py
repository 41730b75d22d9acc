"""fastlclip.runtime: backend selection and fallbacks, buckets, and the graph/compile runtimes' contracts.

On CPU the graph runtime runs with ``emulate=True`` (same static buffers and replay semantics, eager
re-execution) and the compile runtime with torch.compile's ``eager`` backend (Dynamo's tracing, guards
and recompiles, no code generation). The ``gpu`` tests run the real CUDA graphs and Inductor.
"""

import json
import math
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from fastlclip import runtime
from fastlclip.runtime import BackendFallbackWarning

from conftest import TINY

PROMPT = "a photo of a cat"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def load(**kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        return fastlclip.load(TINY, **kw)


def latents(batch, seed=0, device="cpu", dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g).to(device=device, dtype=dtype)
    return x.requires_grad_(requires_grad)


def step(model, x, prompt=PROMPT, space="diffusion"):
    """Loss, latent gradient and features through the model's installed runtime."""
    x = x.detach().clone().requires_grad_(True)
    loss = fastlclip.LatentCLIPReward(model, space=space)(x, prompt)
    (grad,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        feats = model.encode_latents(x.detach(), space=space, normalize=False)
    return loss.detach(), grad, feats


def eager_step(model, x, prompt=PROMPT, space="diffusion"):
    """:func:`step` on the plain eager path (the model's runtime set aside)."""
    rt, backend = model.runtime, model.backend
    runtime.install(model, None)
    try:
        return step(model, x, prompt, space)
    finally:
        if rt is not None:
            runtime.install(model, rt)
        else:
            runtime.apply(model, backend)


@pytest.fixture
def uncompiled(monkeypatch):
    """``torch.compile`` as the identity: the compile runtime's own buffers and bookkeeping, run eagerly (where
    Inductor cannot run, or under a dispatch mode, which Dynamo refuses)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)


def emulated(model, buckets=(1, 2, 4), fused=False):
    return runtime.install(model, runtime.GraphRuntime(model, buckets, fused=fused, emulate=True)).runtime


# -- pure helpers -------------------------------------------------------------------------------------
def test_bucket_for():
    assert [runtime.bucket_for(b) for b in (1, 2, 3, 5, 16, 17, 256, 257, 1000)] == [1, 2, 4, 8, 16, 32, 256, 256, 256]
    assert runtime.bucket_for(3, (2, 6)) == 6
    with pytest.raises(ValueError, match=">= 1"):
        runtime.bucket_for(0)


def test_chunks_and_pad():
    assert runtime.chunks(600, 256) == [(0, 256), (256, 512), (512, 600)]
    assert runtime.chunks(3, 4) == [(0, 3)]
    x = torch.randn(3, 2, requires_grad=True)
    assert runtime.pad_batch(x, 3) is x
    p = runtime.pad_batch(x, 5)
    assert p.shape == (5, 2) and torch.equal(p[:3], x) and not p[3:].any()
    p.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 2))
    with pytest.raises(ValueError):
        runtime.pad_batch(x, 2)


def test_bad_buckets():
    model = load()
    with pytest.raises(ValueError, match="positive ints"):
        runtime.GraphRuntime(model, (0, 4), emulate=True)


# -- selection and fallbacks --------------------------------------------------------------------------
FALLBACKS = [
    ("graph", "backend='graph': CUDA graphs need a CUDA device (the model is on cpu): using the eager backend"),
    ("compile", "backend='compile': the 'compile' backend is built for a CUDA device (the model is on cpu): using "
                "the eager backend"),
    ("auto", "backend='auto' on cpu: using 'eager' (the 'graph' and 'compile' backends need a CUDA device)"),
]


@pytest.mark.parametrize("backend, message", FALLBACKS)
def test_cpu_falls_back_to_eager_with_a_warning(backend, message):
    with pytest.warns(BackendFallbackWarning) as record:
        model = load(backend=backend)
    assert [str(w.message) for w in record if w.category is BackendFallbackWarning] == [message]
    assert model.backend == "eager" and model.runtime is None
    x = latents(2)
    with torch.no_grad():
        got = model.encode_latents(x)
    assert torch.equal(got, load().encode_latents(x).detach())


@pytest.mark.parametrize("backend", [b for b, _ in FALLBACKS])
@pytest.mark.filterwarnings("ignore:.*weights are random")
def test_fallback_warnings_point_at_the_callers_line(backend):
    with pytest.warns(BackendFallbackWarning) as record:
        line = sys._getframe().f_lineno + 1
        fastlclip.load(TINY, backend=backend)  # the caller's line, not its caller's nor fastlclip's
    assert [(w.filename, w.lineno) for w in record if w.category is BackendFallbackWarning] == [(__file__, line)]


def test_set_backend_and_unknown_backend():
    model = load()
    with pytest.warns(BackendFallbackWarning):
        assert model.set_backend("graph").backend == "eager"
    assert model.set_backend("triton").backend == "triton"
    for bad in (lambda: model.set_backend("tensorrt"), lambda: load(backend="tensorrt")):
        with pytest.raises(ValueError, match="unknown backend 'tensorrt'.*'auto'"):
            bad()
    with pytest.raises(TypeError, match="takes no options"):
        model.set_backend("eager", mode="default")
    with pytest.raises(TypeError, match="only cache_path and refresh"):
        model.set_backend("auto", buckets=(1,))


def test_install_freezes_the_tower_and_checks_the_model():
    model, other = load(), load()
    rt = runtime.GraphRuntime(model, emulate=True)
    with pytest.raises(ValueError, match="another model"):
        runtime.install(other, rt)
    runtime.install(model, rt)
    assert model.backend == "graph" and not any(p.requires_grad for p in model.visual.latent_vit.parameters())
    assert model.set_backend("eager").runtime is None


def test_copying_a_model_with_a_runtime_says_how():
    import copy

    model = load()
    emulated(model)
    with pytest.raises(TypeError, match=r"set_backend\('eager'\) first"):
        copy.deepcopy(model)
    copy.deepcopy(model.set_backend("eager"))


# -- graph runtime (emulated replays) -----------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3, 4, 9])  # exact bucket, padded, largest bucket, chunked (4 + 4 + 1)
def test_graph_reward_and_features_match_eager(batch):
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(batch)
    loss = reward(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    feats = model.encode_latents(x, normalize=False)
    (fgrad,) = torch.autograd.grad(feats.square().sum(), x)
    want_loss, want_grad, want_feats = eager_step(model, x)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    torch.testing.assert_close(feats.detach(), want_feats)
    runtime.install(model, None)
    y = x.detach().clone().requires_grad_(True)
    (want_fgrad,) = torch.autograd.grad(model.encode_latents(y, normalize=False).square().sum(), y)
    torch.testing.assert_close(fgrad, want_fgrad)
    assert rt.stats.uncaptured == 0


def test_graph_per_sample_prompts_and_no_grad():
    model = load()
    emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    prompts = ["a cat", "a dog", "a red car"]
    x = latents(3)
    loss = reward(x, prompts)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, want_feats = eager_step(model, x, prompts)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    with torch.no_grad():
        torch.testing.assert_close(reward(x, prompts), want_loss)
    with torch.inference_mode():
        torch.testing.assert_close(reward(x, prompts), want_loss)
        reward(x, "a new prompt")
        torch.testing.assert_close(model.encode_latents(x), F.normalize(want_feats, dim=-1))
    # a prompt first seen under inference_mode still works with autograd afterwards
    loss = reward(x, "a new prompt")
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, _ = eager_step(model, x, "a new prompt")
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


def test_graph_padding_rows_are_cleared():
    """Rows left from a larger earlier batch are zeroed: a NaN there must not reach a later, smaller batch."""
    model = load()
    model.check_finite = False
    emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    bad = latents(4)
    with torch.no_grad():
        bad[3] = float("nan")
    assert reward(bad, PROMPT).isnan()
    x = latents(3)
    loss = reward(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, _ = eager_step(model, x)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("kind", ["graph", "compile"])
def test_first_call_under_inference_mode_leaves_buffers_usable_outside_it(kind):
    """Static buffers made during a call under inference_mode must not be inference tensors: a later call
    outside it writes into them in place (graph) or saves them for backward (compile)."""
    model = load()
    if kind == "graph":
        emulated(model)
    else:
        runtime.install(model, runtime.CompiledRuntime(model, (1, 2), compiler="eager"))
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(2)
    with torch.inference_mode():
        reward(x, PROMPT)
        model.encode_latents(x)
    with torch.no_grad():
        model.encode_latents(x)
    loss = reward(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, _ = eager_step(model, x)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


def test_graph_50_step_loop_captures_once():
    """A ReNO-like loop: capture at the first step only, two replays per step, nothing recomputed."""
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    z = latents(1).detach().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=0.1)
    for i in range(50):
        opt.zero_grad()
        reward(torch.tanh(z), PROMPT).backward()
        opt.step()
        if i == 0:
            first = (rt.stats.captures, rt.stats.compiles)
    assert (rt.stats.captures, rt.stats.compiles) == first == (1, 0)
    assert rt.stats.replays == 100 and rt.stats.recomputes == 0 and rt.stats.uncaptured == 0


def test_graph_outputs_are_not_overwritten_by_the_next_replay():
    model = load()
    emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    x1, x2 = latents(1, seed=1), latents(1, seed=2)
    f1 = model.encode_latents(x1)
    f1_copy = f1.detach().clone()
    model.encode_latents(x2)
    assert torch.equal(f1.detach(), f1_copy)
    l1 = reward(x1, PROMPT)
    (g1,) = torch.autograd.grad(l1, x1)
    l1_val, g1_copy = l1.detach().clone(), g1.clone()
    (g2,) = torch.autograd.grad(reward(x2, PROMPT), x2)
    assert torch.equal(l1.detach(), l1_val) and torch.equal(g1, g1_copy) and not torch.equal(g1, g2)


def test_graph_backward_after_another_forward_recomputes():
    """Two forwards through one captured shape, then both backwards: the stale one re-runs its forward."""
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    x1, x2 = latents(2, seed=1), latents(2, seed=2)
    (reward(x1, "a cat") + 2 * reward(x2, "a dog")).backward()
    _, want1, _ = eager_step(model, x1, "a cat")
    _, want2, _ = eager_step(model, x2, "a dog")
    torch.testing.assert_close(x1.grad, want1)
    torch.testing.assert_close(x2.grad, 2 * want2)
    assert rt.stats.recomputes == 1
    loss = reward(x1, "a cat")  # retain_graph: the second backward finds the state spent
    (a,) = torch.autograd.grad(loss, x1, retain_graph=True)
    (b,) = torch.autograd.grad(loss, x1)
    torch.testing.assert_close(a, b)
    assert rt.stats.recomputes == 2


def test_graph_recaptures_when_the_weights_are_replaced():
    model = load()
    rt = emulated(model)
    x = latents(1)
    model.encode_latents(x)
    with torch.no_grad():
        model.visual.latent_vit.conv1.weight = torch.nn.Parameter(2 * model.visual.latent_vit.conv1.weight,
                                                                  requires_grad=False)
    got = model.encode_latents(x)
    assert rt.stats.invalidations == 1
    torch.testing.assert_close(got.detach(), F.normalize(eager_step(model, x)[2], dim=-1))


def test_graph_weights_requiring_grad_run_uncaptured():
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    model.visual.latent_vit.proj.requires_grad_(True)
    x = latents(2)
    with pytest.warns(BackendFallbackWarning) as record:
        loss = reward(x, PROMPT)
        reward(x, PROMPT)  # warned once per runtime, not per call
    assert [str(w.message) for w in record if w.category is BackendFallbackWarning] == [
        "backend 'graph' treats the image tower's weights as constants, but they require grad: running uncaptured "
        "(freeze them with model.visual.requires_grad_(False), or use the 'triton' backend to train them)"]
    model.requires_grad_(False)
    torch.testing.assert_close(loss, eager_step(model, x)[0])
    assert rt.stats.uncaptured == 2 and rt.stats.captures == 0


def test_graph_with_fused_kernels():
    from fastlclip.kernels.launch import kernels_available

    if not kernels_available("cpu"):
        pytest.skip("the Triton kernels do not run here (no GPU, TRITON_INTERPRET unset)")
    model = load()
    emulated(model, fused=True)
    x = latents(1)
    loss = fastlclip.LatentCLIPReward(model)(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, _ = eager_step(model, x)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)


# -- compile runtime (Dynamo with its eager backend) --------------------------------------------------
def test_compiled_runtime_matches_eager_without_recompiles():
    model = load()
    rt = runtime.install(model, runtime.CompiledRuntime(model, (1, 2), compiler="eager")).runtime
    reward = fastlclip.LatentCLIPReward(model)
    for batch in (1, 3):  # bucket 1; 3 -> chunks of 2 + 1
        x = latents(batch)
        loss = reward(x, PROMPT)
        (grad,) = torch.autograd.grad(loss, x)
        want_loss, want_grad, want_feats = eager_step(model, x)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)
    compiles = rt.stats.compiles
    assert compiles == 2
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(5):
            x = latents(1)
            torch.autograd.grad(reward(x, PROMPT), x)
    assert rt.stats.compiles == compiles
    runtime.install(model, runtime.CompiledRuntime(model, (4,), compiler="eager"))
    x = latents(3, requires_grad=False)  # the tower alone: 3 rows padded to the bucket of 4, cut back to 3
    with torch.no_grad():
        got = model.encode_latents(x, normalize=False)
    torch.testing.assert_close(got, eager_step(model, x)[2])


def test_compiled_runtime_compiles_each_shape_once_and_never_recompiles():
    """One compiled function per bucket, grid, dtype and latent scale, for the tower and the reward step
    apart: a function shared by two of them would recompile (an error here) and, past Dynamo's recompile
    limit, fall back to eager for good."""
    model = load(resize="interpolate")
    rt = runtime.install(model, runtime.CompiledRuntime(model, (2, 4), compiler="eager")).runtime
    calls = [(1, (16, 16), torch.float32, "diffusion"), (2, (16, 16), torch.float32, "diffusion"),  # both bucket 2
             (3, (16, 16), torch.float32, "diffusion"),  # bucket 4
             (1, (16, 24), torch.float32, "diffusion"), (1, (16, 16), torch.float16, "diffusion"),  # grid, dtype
             (1, (16, 16), torch.float32, "vae")]  # another latent scale
    with torch._dynamo.config.patch(error_on_recompile=True):
        for round_ in range(2):  # the second round finds every function compiled
            for batch, grid, dtype, space in calls:
                x = torch.randn(batch, 4, *grid).to(dtype)
                for got, want in zip(step(model, x, space=space), eager_step(model, x, space=space)):
                    torch.testing.assert_close(got, want)
            assert rt.stats.compiles == 2 * 5, round_  # five shapes, for the tower and the reward step each


def test_compiled_reward_keeps_each_calls_prompt_until_its_backward(uncompiled):
    """Two reward calls of one bucket with different prompts, then their backwards: the second call's text
    features must not overwrite the first's, which its backward still reads. The steps run eagerly: the text
    buffers are the runtime's, whatever compiles the steps."""
    model = load()
    runtime.install(model, runtime.CompiledRuntime(model, (2,), compiler="eager"))
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(2)
    prompts = ("a photo of a cat", "a photo of a dog")
    losses = [reward(x, p) for p in prompts]
    for prompt, loss in zip(prompts, losses):
        want_loss, want_grad, _ = eager_step(model, x, prompt)
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(torch.autograd.grad(loss, x)[0], want_grad)


def test_compiled_runtime_applies_the_latent_spaces_shift():
    """FLUX.1's latent space has a shift: the compiled tower and reward steps must apply it, as eager does."""
    import tiny16

    model = tiny16.model()
    z = tiny16.latents(2, seed=4)
    assert model.latent_space.shift_factor != 0
    runtime.install(model, runtime.CompiledRuntime(model, (2,), compiler="eager"))
    for got, want in zip(step(model, z), eager_step(model, z)):
        torch.testing.assert_close(got, want)


def test_compile_mode_is_validated():
    with pytest.raises(ValueError, match="unknown compile mode"):
        runtime.CompiledRuntime(load(), mode="fastest")


@pytest.mark.parametrize("options, want", [
    ({}, {"backend": "inductor", "mode": "reduce-overhead"}),  # the defaults: Inductor with its CUDA graphs
    ({"mode": "max-autotune-no-cudagraphs"}, {"backend": "inductor", "mode": "max-autotune-no-cudagraphs"}),
    ({"compiler": "aot_eager", "mode": "default"}, {"backend": "aot_eager"}),  # a mode is Inductor's alone
])
def test_compiled_runtime_asks_for_one_static_full_graph_per_shape(monkeypatch, options, want):
    """What torch.compile is asked for, recorded where Inductor's modes cannot run (the compiled functions run
    eagerly): ``fullgraph`` (a graph break is an error, never a silent slow path), static shapes, and the mode
    only for Inductor, for the tower and for the reward step alike."""
    asked = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: asked.append(kw) or fn)
    model = load()
    runtime.install(model, runtime.CompiledRuntime(model, (2,), **options))
    x = latents(2)
    for got, expected in zip(step(model, x), eager_step(model, x)):
        torch.testing.assert_close(got, expected)
    assert asked == [{"fullgraph": True, "dynamic": False, **want}] * 2


def test_reduce_overhead_hands_out_copies_of_its_graph_memory(monkeypatch):
    """A CUDA graph's replay writes its outputs into the same memory each time, so reduce-overhead returns
    copies. Inductor's graphs need a GPU; the stand-in here is a compiled function whose output is one static
    tensor, overwritten by each call."""
    def compile_with_static_output(fn, **kw):
        static = []

        def replay(*args):
            out = fn(*args)
            if not static:
                static.append(torch.empty_like(out))
            return static[0].copy_(out)
        return replay

    monkeypatch.setattr(torch, "compile", compile_with_static_output)
    model = load()
    runtime.install(model, runtime.CompiledRuntime(model, (2,), mode="reduce-overhead"))
    x, y = latents(2, seed=1), latents(2, seed=2)
    want_loss, _, want_feats = eager_step(model, x)
    reward = fastlclip.LatentCLIPReward(model)
    with torch.no_grad():
        fx, lx = model.encode_latents(x, normalize=False), reward(x, PROMPT)
        model.encode_latents(y, normalize=False), reward(y, PROMPT)  # replays overwrite the static outputs
    torch.testing.assert_close(fx, want_feats)
    torch.testing.assert_close(lx, want_loss)


def test_compiled_runtime_copies_nothing_without_cuda_graphs(uncompiled):
    """Outputs and gradients are copied out of CUDA-graph memory only: without graphs a reward step runs no
    more copies than the plain eager model (counted per aten op; the compiled functions run eagerly here,
    since Dynamo refuses to trace under a dispatch mode)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.overloadpacket in (torch.ops.aten.clone, torch.ops.aten.copy_)
            return func(*args, **(kwargs or {}))

    def copies_in_a_step(model):
        reward = fastlclip.LatentCLIPReward(model)
        warm, x = latents(2, seed=4), latents(2, seed=5)
        torch.autograd.grad(reward(warm, PROMPT), warm)  # caches the text features, fills the buffers
        with Copies() as copies:
            torch.autograd.grad(reward(x, PROMPT), x)
        return copies.count

    model = load()
    plain = copies_in_a_step(model)
    for options in ({"compiler": "eager"}, {"mode": "max-autotune-no-cudagraphs"}):
        runtime.install(model, runtime.CompiledRuntime(model, (2,), **options))
        assert copies_in_a_step(model) == plain, options


@pytest.mark.parametrize("backend", ["compile", "graph"])
def test_runtime_buffers_are_made_on_the_latents_device(uncompiled, backend):
    """On a GPU the default device (the CPU) is not the latents' device; here the meta device stands in for
    that default: a buffer made without the latents' device would land on it and fail. The steps run eagerly
    (the buffers are the runtime's, whatever compiles or captures the steps)."""
    model = load()
    rt = runtime.CompiledRuntime(model, (2,)) if backend == "compile" else runtime.GraphRuntime(model, (2,), emulate=True)
    x = latents(2)
    want_loss, want_grad, want_feats = eager_step(model, x)
    runtime.install(model, rt)
    reward = fastlclip.LatentCLIPReward(model)
    reward.text_features([PROMPT])  # the tokenizer's tensors are the default device's: cached beforehand
    with torch.device("meta"):
        with torch.no_grad():
            feats = model.encode_latents(x, normalize=False)
        loss = reward(x, PROMPT)
        (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(feats, want_feats)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)


# -- auto: the cache ----------------------------------------------------------------------------------
def test_backend_cache_roundtrip(tmp_path):
    path = tmp_path / "sub" / "backends.json"
    assert runtime.read_cache(path) == {}
    runtime.write_cache(path, "k1", {"backend": "graph"})
    runtime.write_cache(path, "k2", {"backend": "eager"})
    assert runtime.read_cache(path) == {"k1": {"backend": "graph"}, "k2": {"backend": "eager"}}
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable backend cache"):
        assert runtime.read_cache(path) == {}


def test_auto_uses_the_cached_choice(tmp_path, monkeypatch):
    model = load()
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    path = tmp_path / "backends.json"
    key = runtime.cache_key("Fake GPU", f"{model.cfg.name} {model.cfg.vision}", model.dtype)
    path.write_text(json.dumps({key: {"backend": "triton"}}))
    monkeypatch.setattr(runtime.timing, "time_backends", lambda *a, **k: pytest.fail("timed despite a cached choice"))
    assert runtime.choose_backend(model, cache_path=path) == "triton"
    monkeypatch.setattr(runtime.timing, "time_backends", lambda *a, **k: ({"eager": 2.0, "graph": 1.0}, {"compile": "err"}))
    assert runtime.choose_backend(model, cache_path=path, refresh=True) == "graph"
    assert json.loads(path.read_text())[key]["reward_step_ms"] == {"eager": 2.0, "graph": 1.0}


def test_time_backends_leaves_the_model_as_it_was():
    """Off CUDA the timing itself fails (recorded as a failure); the model's state is restored either way."""
    model = load()
    model.train()
    model.visual.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    times, failures = runtime.time_backends(model, ("eager",), trials=1, steps=1)
    assert set(times) | set(failures) == {"eager"}
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert model.check_finite and model.backend == "eager" and model.runtime is None


def test_time_backends_times_on_the_models_device(monkeypatch):
    model = load()
    seen = []
    monkeypatch.setattr(runtime.timing, "time_cuda", lambda fn, **kw: seen.append(kw.get("device")) or 1.0)
    times, failures = runtime.time_backends(model, ("eager",))
    assert times == {"eager": 1.0} and not failures and seen == [model.device]


def test_default_cache_path(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTLCLIP_CACHE_DIR", str(tmp_path))
    assert runtime.default_cache_path() == tmp_path / "backends.json"


# -- on a GPU -----------------------------------------------------------------------------------------
# Graph tests use Latent-ViT-B/8 (capture takes milliseconds); compile tests the tiny config (Inductor
# compiles a 12-layer tower for a minute per shape; bench.reward checks the full models against the reference).
B8 = "Latent-ViT-B-8-512"


def _gpu_model(backend, config=B8, **options):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        model = fastlclip.load(config, device="cuda", dtype=torch.bfloat16)
    model.check_finite = False
    return model.set_backend(backend, **options)


def _cos(a, b):
    return F.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=-1).min().item()


def _gpu_latents(model, batch, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    size = model.latent_size
    return torch.randn(batch, 4, size, size, device="cuda", generator=g).bfloat16().requires_grad_(True)


def _reward_grad(model, x, prompt=PROMPT):
    x = x.detach().clone().requires_grad_(True)
    loss = fastlclip.LatentCLIPReward(model)(x, prompt)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend, config, options", [
    ("graph", B8, {}),
    ("compile", TINY, {"buckets": (1, 2, 4)}),  # batches 3 and 300 share bucket 4: fewer compiles
])
@pytest.mark.parametrize("batch", [1, 3, 300])  # a bucket, padded, over the largest bucket
def test_gpu_matches_eager(backend, config, options, batch):
    model = _gpu_model("eager", config)
    x = _gpu_latents(model, batch)
    want_loss, want_grad = _reward_grad(model, x)
    with torch.no_grad():
        want_feats = model.encode_latents(x)
    model.set_backend(backend, **options)
    loss, grad = _reward_grad(model, x)
    with torch.no_grad():
        feats = model.encode_latents(x)
    assert abs(loss.item() - want_loss.item()) < 0.05
    assert _cos(feats, want_feats) >= 0.999
    assert _cos(grad, want_grad) >= 0.999


@pytest.mark.gpu
@cuda
def test_gpu_graph_loop_captures_once_never_syncs_and_keeps_outputs():
    model = _gpu_model("graph")
    rt = model.runtime
    reward = fastlclip.LatentCLIPReward(model)
    z = _gpu_latents(model, 1).detach().float().requires_grad_(True)
    opt = torch.optim.SGD([z], lr=1.0, momentum=0.9, nesterov=True)
    losses, grads = [], []
    try:
        for i in range(50):
            opt.zero_grad()
            if i == 1:
                torch.cuda.set_sync_debug_mode("error")  # the steady state never waits for the GPU
            loss = reward(z.bfloat16(), PROMPT)
            loss.backward()
            losses.append(loss.detach())
            grads.append(z.grad.clone())
            opt.step()
            if i == 0:
                captures = rt.stats.captures
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rt.stats.captures == captures == 1 and rt.stats.recomputes == 0
    assert rt.stats.replays == 100
    assert len({round(v.item(), 5) for v in losses}) > 1
    # step 0's loss and gradient were not overwritten by the 49 replays after it
    model.set_backend("eager")
    want_loss, want_grad = _reward_grad(model, _gpu_latents(model, 1).detach().float().bfloat16())
    assert abs(losses[0].item() - want_loss.item()) < 0.05
    assert _cos(grads[0], want_grad) >= 0.999


@pytest.mark.gpu
@cuda
def test_gpu_graph_stale_backward_is_recomputed():
    model = _gpu_model("graph")
    reward = fastlclip.LatentCLIPReward(model)
    x1, x2 = _gpu_latents(model, 2, seed=1), _gpu_latents(model, 2, seed=2)
    (reward(x1, "a cat") + reward(x2, "a dog")).backward()
    assert model.runtime.stats.recomputes == 1
    model.set_backend("eager")
    assert _cos(x1.grad, _reward_grad(model, x1, "a cat")[1]) >= 0.999
    assert _cos(x2.grad, _reward_grad(model, x2, "a dog")[1]) >= 0.999


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("mode", runtime.COMPILE_MODES)
def test_gpu_compile_modes_do_not_recompile(mode):
    model = _gpu_model("compile", TINY, mode=mode)
    rt = model.runtime
    reward = fastlclip.LatentCLIPReward(model)
    x = _gpu_latents(model, 1)
    loss, grad = _reward_grad(model, x)
    compiles = rt.stats.compiles
    assert compiles >= 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(50):
            y = _gpu_latents(model, 1, seed=i)
            (g,) = torch.autograd.grad(reward(y, PROMPT), y)
    assert rt.stats.compiles == compiles
    prev = g.clone()
    y = _gpu_latents(model, 1, seed=99)
    torch.autograd.grad(reward(y, PROMPT), y)
    assert torch.equal(g, prev)  # not overwritten by the next call (reduce-overhead's CUDA graphs included)
    model.set_backend("eager")
    assert _cos(grad, _reward_grad(model, x)[1]) >= 0.999


@pytest.mark.gpu
@cuda
def test_gpu_auto_measures_once_then_reads_the_cache(tmp_path, monkeypatch):
    timed = runtime.timing.time_backends
    monkeypatch.setattr(runtime.timing, "time_backends", lambda model: timed(model, ("eager", "graph")))  # no compile wait
    path = tmp_path / "backends.json"
    model = _gpu_model("auto", cache_path=path)
    assert model.backend in ("eager", "graph")
    entry = next(iter(json.loads(path.read_text()).values()))
    assert entry["backend"] == model.backend and set(entry["reward_step_ms"]) == {"eager", "graph"}
    monkeypatch.setattr(runtime.timing, "time_backends", lambda *a, **k: pytest.fail("timed twice"))
    assert _gpu_model("auto", cache_path=path).backend == model.backend


# -- defects a GPU would show, reproduced with the emulation / Dynamo's eager backend ----------------------
def test_graph_key_includes_autocast():
    """A capture under autocast freezes bf16 kernels: an fp32 call afterwards must not replay it."""
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reward(x, PROMPT)
    loss = reward(x, PROMPT)
    assert rt.stats.captures == 2
    torch.testing.assert_close(loss, eager_step(model, x)[0])


@pytest.mark.parametrize("backend", ["triton", "graph"])
def test_float64_latents_as_eager_takes_them(backend):
    from fastlclip.kernels.launch import kernels_available

    if not kernels_available("cpu"):
        pytest.skip("the Triton kernels do not run here (no GPU, TRITON_INTERPRET unset)")
    model = load(backend="triton") if backend == "triton" else load()
    if backend == "graph":
        emulated(model, fused=True)
    x = latents(2, dtype=torch.float64)
    loss = fastlclip.LatentCLIPReward(model)(x, PROMPT)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, _ = eager_step(load(), x)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(loss, want_loss.to(loss.dtype), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, want_grad, rtol=1e-3, atol=1e-6)


def test_compiled_runtime_does_not_recompile_per_memory_layout():
    model = load()
    rt = runtime.install(model, runtime.CompiledRuntime(model, (2,), compiler="eager")).runtime
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(2).detach()
    layouts = [x, x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)]
    for y in layouts:
        y = y.requires_grad_(True)
        (grad,) = torch.autograd.grad(reward(y, PROMPT), y)
        torch.testing.assert_close(grad, eager_step(model, y)[1])
    assert rt.stats.compiles == 1


def test_reduce_overhead_marks_a_step_only_when_no_backward_is_pending(monkeypatch):
    """Inductor's CUDA graphs reuse a step's memory once a new step is marked: marking while a backward
    is pending (two forwards then their backwards) would hand the pending backward overwritten activations."""
    model = load()
    rt = runtime.install(model, runtime.CompiledRuntime(model, (1,), compiler="eager")).runtime
    rt.cudagraphs = True  # as mode="reduce-overhead" with Inductor, whose graphs need a GPU
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(rt._pending)))
    reward = fastlclip.LatentCLIPReward(model)
    x, y = latents(1, seed=1), latents(1, seed=2)
    loss_x = reward(x, PROMPT)  # nothing pending: a new step
    loss_y = reward(y, PROMPT)  # x's backward pending: same step
    with torch.no_grad():
        model.encode_latents(y.detach())  # still pending
    (gx,) = torch.autograd.grad(loss_x, x)
    (gy,) = torch.autograd.grad(loss_y, y)
    del loss_x, loss_y
    reward(x, PROMPT)  # both backwards ran: a new step
    assert marks == [0, 0]
    torch.testing.assert_close(gx, eager_step(model, x)[1])
    torch.testing.assert_close(gy, eager_step(model, y)[1])
    dropped = reward(y, PROMPT)  # nothing pending: a new step
    reward(x, PROMPT)  # dropped's backward is pending: same step
    del dropped  # a forward whose backward never runs stops being pending once its graph is gone
    reward(x, PROMPT)
    assert marks == [0, 0, 0, 0]


def test_graphs_share_one_pool_so_any_replay_spends_a_pending_backward():
    model = load()
    rt = emulated(model, buckets=(1, 2))
    reward = fastlclip.LatentCLIPReward(model)
    x, y = latents(1), latents(2, seed=3)
    loss_x = reward(x, PROMPT)
    reward(y, PROMPT)  # another entry's replay may have reused x's activations
    (gx,) = torch.autograd.grad(loss_x, x)
    assert rt.stats.recomputes == 1
    torch.testing.assert_close(gx, eager_step(model, x)[1])


def test_graph_entries_are_bounded_least_recently_used_first():
    model = load()
    rt = runtime.install(model, runtime.GraphRuntime(model, (1, 2, 4), emulate=True, max_entries=2)).runtime
    with pytest.raises(ValueError, match="max_entries"):
        runtime.GraphRuntime(model, emulate=True, max_entries=0)
    with torch.no_grad():
        for batch in (1, 2, 1, 4, 1, 2):  # 4 evicts 2 (1 was used since), then 2 evicts 4
            model.encode_latents(latents(batch, requires_grad=False))
    assert rt.stats.captures == 4 and len(rt._entries) == 2


@pytest.mark.parametrize("replace", ["ln_post", "block", "logit_scale"])
def test_graph_weights_fingerprint_covers_every_parameter(replace):
    model = load()
    rt = emulated(model)
    x = latents(1)
    with torch.no_grad():
        model.encode_latents(x)
        tower = model.visual.latent_vit
        if replace == "ln_post":
            tower.ln_post = torch.nn.LayerNorm(tower.ln_post.normalized_shape)
        elif replace == "block":
            block = tower.transformer.resblocks[-1]
            block.mlp.c_fc.weight = torch.nn.Parameter(block.mlp.c_fc.weight * 2)
        else:
            model.logit_scale = torch.nn.Parameter(model.logit_scale + 1)
        model.encode_latents(x)
    assert rt.stats.invalidations == 1


# -- the same defects on a GPU (one check each; the CPU tests above reproduce them without one) ------------
@pytest.mark.gpu
@cuda
def test_gpu_graph_autocast_fp64_and_replaced_weights():
    model = _gpu_model("graph", TINY)
    rt, reward, tower = model.runtime, fastlclip.LatentCLIPReward(model), model.visual.latent_vit
    x = _gpu_latents(model, 1).detach().float().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        reward(x, PROMPT)
    loss, grad = _reward_grad(model, x)  # no autocast: a capture of its own, not the float16 one
    loss64, grad64 = _reward_grad(model, x.double())
    old_ln = tower.ln_post
    tower.ln_post = torch.nn.LayerNorm(old_ln.normalized_shape).to("cuda", torch.bfloat16)
    with torch.no_grad():
        tower.ln_post.weight.uniform_(0.5, 1.5)
    loss_new, _ = _reward_grad(model, x)
    assert rt.stats.invalidations == 1 and rt.stats.captures >= 3
    model.set_backend("eager")
    want_new = _reward_grad(model, x)[0]
    tower.ln_post = old_ln
    want_loss, want_grad = _reward_grad(model, x)
    assert abs(loss.item() - want_loss.item()) < 0.05 and _cos(grad, want_grad) >= 0.999
    assert grad64.dtype == torch.float64 and abs(loss64.item() - want_loss.item()) < 0.05
    assert abs(loss_new.item() - want_new.item()) < 0.05 and abs(want_new.item() - want_loss.item()) > 0.05


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("backend, options", [("graph", {"buckets": (1, 2)}), ("compile", {"buckets": (1, 2)})])
def test_gpu_two_forwards_then_backwards(backend, options):
    """Shared graph pool / reduce-overhead steps: a pending backward survives another shape's replay."""
    model = _gpu_model(backend, TINY, **options)
    reward = fastlclip.LatentCLIPReward(model)
    x, y = _gpu_latents(model, 1, seed=1), _gpu_latents(model, 2, seed=2)
    loss_x, loss_y = reward(x, PROMPT), reward(y, PROMPT)
    with torch.no_grad():
        model.encode_latents(y)
    (gx,) = torch.autograd.grad(loss_x, x)
    (gy,) = torch.autograd.grad(loss_y, y)
    model.set_backend("eager")
    assert _cos(gx, _reward_grad(model, x)[1]) >= 0.999 and _cos(gy, _reward_grad(model, y)[1]) >= 0.999


@pytest.mark.gpu
@cuda
def test_gpu_reno_with_a_captured_reward_and_checkpointing():
    from bench import tiny
    from fastlclip import reno

    gen = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=64, width=64, device="cuda")
    model = _gpu_model("graph", tiny.LATENT_CLIP)
    result = reno.optimize(gen, fastlclip.LatentCLIPReward(model), PROMPT, iterations=3, gradient_checkpointing=True,
                           progress=False)
    assert model.runtime.stats.replays == 5 and all(map(math.isfinite, result.losses))


# -- gaps found by mutation testing (issue 22 section 5) ----------------------------------------------------------
def _noisy16():
    """A noise-aware 16-channel model with FLUX.1's constants (a non-zero latent shift), noise embedding non-zero."""
    import tiny16

    model = tiny16.model(noise_aware=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.visual.latent_vit.noise_embed.mlp[2].parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model, tiny16.latents(3, seed=5)


@pytest.mark.parametrize("fused", [False, True])
def test_graph_noise_level_calls_run_uncaptured_with_the_shift_and_warn_once(fused):
    model, z = _noisy16()
    with torch.no_grad():
        want = model.encode_latents(z, noise_level=0.6)  # eager, before any runtime
        clean = model.encode_latents(z)
    rt = emulated(model, fused=fused)
    with pytest.warns(BackendFallbackWarning) as record, torch.no_grad():
        first = model.encode_latents(z, noise_level=0.6)
        second = model.encode_latents(z, noise_level=0.6)
    messages = [str(w.message) for w in record if w.category is BackendFallbackWarning]
    assert messages == ["backend 'graph' captures clean-latent calls only: calls with a noise_level run the image "
                        "tower uncaptured" + (" (with the Triton kernels)" if fused else "")]
    tol = 2e-5 if fused else 0.0
    torch.testing.assert_close(first, want, rtol=0, atol=tol)
    torch.testing.assert_close(second, want, rtol=0, atol=tol)
    assert (rt.stats.uncaptured, rt.stats.captures) == (2, 0)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_latents(z), clean, rtol=0, atol=2e-5)  # captured, with the shift
    assert rt.stats.captures == 1 and (first - clean).abs().max() > 1e-3


def test_cache_key_names_gpu_model_dtype_and_versions():
    import triton

    key = runtime.cache_key("Fake GPU", "Latent-ViT-B-8-512 cfg", torch.bfloat16)
    assert key == (f"Fake GPU | Latent-ViT-B-8-512 cfg | bfloat16 | torch {torch.__version__} | "
                   f"triton {triton.__version__}")


def test_default_backend_cache_path_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTLCLIP_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.default_cache_path() == tmp_path / "xdg" / "fastlclip" / "backends.json"
    monkeypatch.setenv("FASTLCLIP_CACHE_DIR", "")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.default_cache_path() == tmp_path / "home" / ".cache" / "fastlclip" / "backends.json"


def test_backend_cache_file_is_sorted_indented_json_in_new_folders(tmp_path):
    path = tmp_path / "a" / "b" / "backends.json"
    runtime.write_cache(path, "z", {"backend": "graph", "a": 1})
    runtime.write_cache(path, "k", {"backend": "eager"})
    assert path.read_text() == ('{\n  "k": {\n    "backend": "eager"\n  },\n  "z": {\n    "a": 1,\n'
                                '    "backend": "graph"\n  }\n}\n')
    path.write_text("[1, 2]")  # JSON, but not a mapping
    assert runtime.read_cache(path) == {}


def test_auto_times_on_the_models_gpu_and_records_the_choice(tmp_path, monkeypatch, caplog):
    import datetime
    import logging

    model = load()
    names = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names.append(device) or "Fake GPU")
    timed = []
    monkeypatch.setattr(runtime.timing, "time_backends", lambda m: timed.append(m) or ({"eager": 2.0, "graph": 1.0},
                                                                                      {"compile": "err"}))
    monkeypatch.setenv("FASTLCLIP_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fastlclip.runtime.select"):
        assert runtime.choose_backend(model) == "graph"
    key = runtime.cache_key("Fake GPU", f"{model.cfg.name} {model.cfg.vision}", model.dtype)
    assert names == [model.device] and timed == [model]
    path = tmp_path / "backends.json"
    assert caplog.messages == [f"fastlclip: timing the backends for {key} once (cached in {path})"]
    entry = json.loads((tmp_path / "backends.json").read_text())[key]
    assert entry["backend"] == "graph" and entry["failed"] == {"compile": "err"}
    date = datetime.datetime.fromisoformat(entry["date"])
    assert date.utcoffset() == datetime.timedelta(0) and date.microsecond == 0
    assert abs((datetime.datetime.now(datetime.timezone.utc) - date).total_seconds()) < 600


def test_time_backends_runs_one_reward_step_per_backend_as_a_reward_would(monkeypatch):
    """time_cuda faked: it runs the step once and records the state it runs in; the defaults are 5 trials of 20."""
    from fastlclip.kernels import launch

    model = load()
    model.train()
    seen = []

    def time_cuda(fn, *, trials, steps, device):
        fn()  # the step: a forward and a backward to the latents, through the backend set
        grad = any(p.requires_grad for p in model.parameters())
        seen.append((model.backend, model.check_finite, model.training, grad))
        return 10.0 * trials + steps

    monkeypatch.setattr(runtime.timing, "time_cuda", time_cuda)
    monkeypatch.setattr(launch, "kernels_available", lambda device=None: False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BackendFallbackWarning)  # graph on a CPU: eager
        times, failures = runtime.time_backends(model, ("triton", "eager", "graph"))
    assert failures == {} and times == {"eager": 70.0, "graph": 70.0}  # triton skipped: no kernels here
    assert seen == [("eager", False, False, False), ("eager", False, False, False)]
    monkeypatch.setattr(launch, "kernels_available", lambda device=None: True)
    times, failures = runtime.time_backends(model, ("triton",), trials=2, steps=3)
    assert failures == {} and times == {"triton": 23.0} and seen[-1] == ("triton", False, False, False)
    assert model.training and model.backend == "eager"


def test_a_runtime_tower_called_directly_reads_latents_unscaled():
    """``model.visual.latent_vit(x)`` with an installed runtime: the tower's own defaults (scale 1, shift 0)."""
    model = load()
    x = latents(2, requires_grad=False)
    with torch.no_grad():
        want = type(model.visual.latent_vit).forward(model.visual.latent_vit, x)
        emulated(model)
        torch.testing.assert_close(model.visual.latent_vit(x), want, rtol=0, atol=1e-6)


def test_graph_replaced_weight_that_requires_grad_runs_uncaptured_after_one_reset():
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    x = latents(1)
    reward(x, PROMPT)
    tower = model.visual.latent_vit
    tower.ln_post.weight = torch.nn.Parameter(tower.ln_post.weight.detach() * 1.5)  # a new tensor, requiring grad
    with pytest.warns(BackendFallbackWarning, match="treats the image tower's weights as constants"):
        loss = reward(x, PROMPT)
        reward(x, PROMPT)
    assert (rt.stats.invalidations, rt.stats.uncaptured, rt.stats.captures) == (1, 2, 1)
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, eager_step(model, x)[1])


@pytest.mark.parametrize("compiler, mode, cudagraphs", [
    ("inductor", "reduce-overhead", True), ("inductor", "default", False),
    ("inductor", "max-autotune-no-cudagraphs", False), ("eager", "reduce-overhead", False),
    ("aot_eager", "not an inductor mode", False),  # modes are Inductor's: other compilers ignore them
])
def test_compile_backend_settings_without_compiling(compiler, mode, cudagraphs):
    model = load()
    rt = runtime.CompiledRuntime(model, (4, 1, 2, 2), mode=mode, compiler=compiler)
    assert (rt.model, rt.buckets, rt.mode, rt.compiler, rt.cudagraphs) == (model, (1, 2, 4), mode, compiler, cudagraphs)
    assert rt.backend == "compile" and rt.stats == runtime.Stats()


def test_graph_tower_captures_for_grad_only_when_the_latents_need_it():
    """Latents without grad share one capture whether or not grad mode is on; only grad-requiring latents
    under grad mode get the capture with a backward graph."""
    model = load()
    rt = emulated(model)
    x = latents(2, requires_grad=False)
    want = model.encode_latents(x).detach()
    with torch.no_grad():
        model.encode_latents(x)
    assert rt.stats.captures == 1
    with torch.no_grad():
        model.encode_latents(x.clone().requires_grad_(True))  # grad mode off: no backward needed either
    assert rt.stats.captures == 1
    y = x.clone().requires_grad_(True)
    got = model.encode_latents(y)
    assert rt.stats.captures == 2 and got.requires_grad
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)


def test_graph_reward_with_a_shift_and_a_noise_level_matches_eager():
    """On a latent space with a shift (FLUX.1's constants): the captured clean reward step and the uncaptured
    noisy one give eager's loss and latent gradient."""
    model, z = _noisy16()
    reward = fastlclip.LatentCLIPReward(model)

    def step(s=None):
        x = z.clone().requires_grad_(True)
        loss = reward(x, PROMPT, noise_level=s)
        return loss.detach(), torch.autograd.grad(loss, x)[0]

    want_clean, want_noisy = step(), step(0.6)
    rt = emulated(model)
    with pytest.warns(BackendFallbackWarning, match="noise_level"):
        got_noisy = step(0.6)
    got_clean = step()
    assert (rt.stats.captures, rt.stats.uncaptured) == (1, 1)
    for got, want in ((got_clean, want_clean), (got_noisy, want_noisy)):
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-4)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-6)
    assert (want_noisy[0] - want_clean[0]).abs() > 1e-4
    with torch.no_grad():
        reward(z[:2], PROMPT)  # another bucket: a capture without a backward graph
    reward(z[:2], PROMPT)  # grad mode on, latents without grad: that capture again
    assert rt.stats.captures == 2


def test_graph_chunks_at_the_largest_bucket_with_a_prompt_per_sample():
    """5 latents over buckets (1, 2, 4): two chunks (4 + 1), each with its own rows of the per-sample prompts."""
    model = load()
    rt = emulated(model)
    reward = fastlclip.LatentCLIPReward(model)
    prompts = ["a cat", "a dog", "a red car", "a tree", "a boat"]
    x = latents(5)
    loss = reward(x, prompts)
    (grad,) = torch.autograd.grad(loss, x)
    want_loss, want_grad, _ = eager_step(model, x, prompts)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    replays = rt.stats.replays
    with torch.no_grad():
        reward(x[:4], prompts[:4])  # the largest bucket: one chunk, one replay
    assert rt.stats.replays == replays + 1


def test_reward_runs_as_one_captured_step_not_a_captured_tower():
    model = load()
    rt = emulated(model)
    x = latents(2)
    torch.autograd.grad(fastlclip.LatentCLIPReward(model)(x, PROMPT), x)
    assert [key[0] for key in rt._entries] == ["reward"]


def test_time_backends_records_why_a_backend_failed(monkeypatch):
    def time_cuda(fn, **kwargs):
        raise RuntimeError("no CUDA device here")

    monkeypatch.setattr(runtime.timing, "time_cuda", time_cuda)
    assert runtime.time_backends(load(), ("eager",)) == ({}, {"eager": "RuntimeError: no CUDA device here"})


def test_graph_features_in_two_chunks_and_buckets_of_the_runtime():
    model = load()
    x = latents(5, requires_grad=False)
    with torch.no_grad():
        want = model.encode_latents(x)
        rt = emulated(model)  # buckets (1, 2, 4): 4 + 1
        torch.testing.assert_close(model.encode_latents(x), want, rtol=0, atol=1e-6)
        runtime.install(model, None)
        rt = runtime.install(model, runtime.GraphRuntime(model, (3,), emulate=True)).runtime
        model.encode_latents(x[:1])
        model.encode_latents(x[:2])  # batches 1 and 2 both pad to the runtime's only bucket, 3
    assert rt.stats.captures == 1


def test_graph_counts_every_invalidation():
    model = load()
    rt = emulated(model)
    tower = model.visual.latent_vit
    with torch.no_grad():
        for _ in range(2):
            model.encode_latents(latents(1, requires_grad=False))
            tower.ln_post.weight = torch.nn.Parameter(tower.ln_post.weight.detach().clone(), requires_grad=False)
        model.encode_latents(latents(1, requires_grad=False))
    assert rt.stats.invalidations == 2


def test_time_backends_times_one_latent_in_the_models_dtype(monkeypatch):
    model = load().double()
    seen = []
    loss = runtime.timing.reward_loss
    monkeypatch.setattr(runtime.timing, "reward_loss", lambda m, x, *a: seen.append((x.shape, x.dtype)) or loss(m, x, *a))
    monkeypatch.setattr(runtime.timing, "time_cuda", lambda fn, **kw: fn() or 1.0)
    assert runtime.time_backends(model, ("eager",)) == ({"eager": 1.0}, {})
    assert seen == [((1, 4, 16, 16), torch.float64)]


def test_runtime_of_anything_without_one_is_none():
    """ReNO asks for the runtime of a reward's model, which may be missing or a model built without fastlclip.load."""
    assert runtime.runtime_of(None) is None and runtime.runtime_of(object()) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_graph_replays_under_the_autocast_of_its_capture(dtype):
    """A captured step replays with the autocast dtype it was captured under, as eager computes under it."""
    model = load()
    x = latents(2, requires_grad=False)
    with torch.no_grad():
        plain = model.encode_latents(x)
        with torch.autocast("cpu", dtype=dtype):
            want = model.encode_latents(x)
        rt = emulated(model)
        with torch.autocast("cpu", dtype=dtype):
            model.encode_latents(x)  # the capture
            got = model.encode_latents(x)  # a replay
    assert rt.stats.captures == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (want.float() - plain).abs().max() > 1e-4  # autocast does change the result


def test_triton_backend_runs_the_fused_kernels_and_eager_takes_them_off(kernel_calls):
    """Whether backend='triton' (and a fused graph runtime) runs fastlclip.kernels: the attention of every
    image-tower block and the patch embedding, counted."""
    from fastlclip.kernels.launch import kernels_available
    from fastlclip.model import PackedAttention

    calls = kernel_calls
    model = load()
    blocks = sum(isinstance(m, PackedAttention) for m in model.visual.latent_vit.modules())
    assert blocks == TINY["vision_cfg"]["layers"]
    x = latents(2, requires_grad=False)

    def run(**kwargs):
        calls.update(attention=0, patch_embed=0)
        with torch.no_grad():
            model.encode_latents(x, **kwargs)
        return dict(calls)

    assert run() == {"attention": 0, "patch_embed": 0}
    if kernels_available(model.device):  # TRITON_INTERPRET=1 on a CPU-only machine: nothing to warn of
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.set_backend("triton")
    else:  # a CPU model on a CUDA machine: warned, and the kernels' PyTorch fallbacks run
        with pytest.warns(RuntimeWarning, match="backend='triton' on cpu"):
            model.set_backend("triton")
    assert run() == {"attention": blocks, "patch_embed": 1}
    model.set_backend("eager")
    assert run() == {"attention": 0, "patch_embed": 0}
    for fused in (True, False):  # the emulated graph runtime: a capture, then a replay re-runs the tower once
        emulated(model, fused=fused)
        run()
        assert run() == ({"attention": blocks, "patch_embed": 1} if fused else {"attention": 0, "patch_embed": 0})


def test_auto_takes_cache_path_and_refresh_and_passes_them_to_the_timing(tmp_path, monkeypatch):
    from fastlclip.model import LatentCLIP

    model = load()
    with pytest.warns(BackendFallbackWarning) as record:
        assert model.set_backend("auto", cache_path=tmp_path / "b.json", refresh=True).backend == "eager"
    assert [str(w.message) for w in record] == [
        "backend='auto' on cpu: using 'eager' (the 'graph' and 'compile' backends need a CUDA device)"]
    with pytest.raises(TypeError, match=r"takes only cache_path and refresh, got \['buckets'\]"):
        model.set_backend("auto", cache_path=tmp_path / "b.json", buckets=(1,))
    seen = []
    monkeypatch.setattr(LatentCLIP, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(runtime.select, "choose_backend", lambda m, **kw: seen.append((m, kw)) or "triton")
    assert runtime.apply(model, "auto", cache_path=tmp_path / "b.json", refresh=True).backend == "triton"
    assert runtime.apply(model, "auto").backend == "triton"
    assert seen == [(model, {"cache_path": tmp_path / "b.json", "refresh": True}), (model, {})]


def test_graph_runtime_settings_and_their_defaults():
    from fastlclip.kernels.launch import kernels_available

    model = load()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device; the model is on cpu"):
        runtime.GraphRuntime(model)  # not emulated by default
    rt = runtime.GraphRuntime(model, emulate=True)
    assert rt.max_entries == 8  # docs/backends.md
    assert rt.fused is kernels_available(model.device)  # the kernels when they can run
    assert runtime.GraphRuntime(model, emulate=True, fused=False).fused is False
    assert runtime.GraphRuntime(model, emulate=True, max_entries=1).max_entries == 1


def test_graph_and_compile_backends_build_their_runtime_with_the_options_on_a_gpu(monkeypatch):
    """On a (stand-in) CUDA model, set_backend builds the runtime with the options given and installs it; the
    graph runtime emulated and the compile runtime not yet compiled, so this runs on the CPU."""
    from fastlclip.model import LatentCLIP

    model = load()
    monkeypatch.setattr(LatentCLIP, "device", property(lambda self: torch.device("cuda")))
    model.set_backend("graph", buckets=(1, 2), emulate=True, max_entries=3)
    rt = model.runtime
    assert isinstance(rt, runtime.GraphRuntime) and model.backend == "graph" and rt.model is model
    assert (rt.buckets, rt.emulate, rt.max_entries) == ((1, 2), True, 3)
    assert model.visual.latent_vit.forward == rt.encode  # installed: the tower runs through the runtime
    model.set_backend("compile", buckets=(4,), mode="max-autotune-no-cudagraphs")
    rt = model.runtime
    assert isinstance(rt, runtime.CompiledRuntime) and model.backend == "compile"
    assert (rt.buckets, rt.mode) == ((4,), "max-autotune-no-cudagraphs")
    assert model.visual.latent_vit.forward == rt.encode
