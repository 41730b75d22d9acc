"""Latent grids other than the trained one: the resize policies, their fast paths, their errors.

The tiny config is trained on 16x16 latents with patch 4 (a 4x4 grid, 17 tokens); 32x32 plays SDXL's
1024 px (128x128 for the 512 px configs) and 40x32 / 32x24 its other aspect ratios.
"""

import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import fastlclip
from fastlclip import grids, runtime
from conftest import TINY, official_state, open_clip_reference, tiny_vae

LATENT = TINY["vision_cfg"]["image_size"] // 8  # 16
PATCH = TINY["vision_cfg"]["patch_size"]  # 4
PROMPT = "a photo of a cat"


def load(**kw):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        return fastlclip.load(TINY, **kw)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# -- the positional table: open_clip's own resize_pos_embed is the reference ---------------------------
@pytest.mark.parametrize("grid", [(8, 8), (10, 8), (6, 7), (2, 3), (4, 4), (1, 3), (1, 1)])  # (1, n): a single row
def test_resize_pos_embed_matches_open_clip(grid):
    from open_clip.model import resize_pos_embed as open_clip_resize

    pos = randn(1 + 4 * 4, 24, seed=1, dtype=torch.float64)
    state = {"visual.positional_embedding": pos.clone()}
    fake = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=grid))
    open_clip_resize(state, fake)  # bicubic, antialias, class token kept; in place
    got = grids.resize_pos_embed(pos, grid)
    assert got.shape == (1 + grid[0] * grid[1], 24) and got.dtype == torch.float64
    torch.testing.assert_close(got, state["visual.positional_embedding"], rtol=0, atol=1e-12)
    assert torch.equal(got[0], pos[0])  # the class token as it was


def test_resize_pos_embed_low_precision_upcasts():
    pos = randn(17, 32, seed=2)
    got = grids.resize_pos_embed(pos.bfloat16(), (8, 6))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), grids.resize_pos_embed(pos, (8, 6)), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("shape", [(32, 32), (40, 32), (32, 24)])
def test_interpolate_matches_open_clip_tower_at_its_own_size(tmp_path, shape):
    """open_clip's VisionTransformer built for the larger grid, its positions resized by open_clip: the
    independent reference for resize='interpolate'."""
    import open_clip
    from open_clip.model import resize_pos_embed as open_clip_resize

    ref = open_clip_reference()
    path = tmp_path / "epoch_34.pt"
    torch.save(official_state(ref, tiny_vae()), path)
    model = fastlclip.load(TINY, path, dtype=torch.float32, resize="interpolate").double()

    v = TINY["vision_cfg"]
    big = open_clip.model.CLIP(embed_dim=TINY["embed_dim"], text_cfg=TINY["text_cfg"],
                               vision_cfg={"image_size": shape, "patch_size": v["patch_size"], "width": v["width"],
                                           "layers": v["layers"], "head_width": v["head_width"]})
    big.visual.conv1 = torch.nn.Conv2d(4, v["width"], v["patch_size"], v["patch_size"], bias=False)
    big = big.double().eval()
    state = {k: v.double() for k, v in ref.state_dict().items()}
    open_clip_resize(state, big)  # in float64, as fastlclip resamples a float64 model's table
    big.load_state_dict(state)

    z = randn(2, 4, *shape, seed=3, dtype=torch.float64)
    got = model.encode_latents(z, space="vae", normalize=False)
    want = big.encode_image(z)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# -- the pool policy ----------------------------------------------------------------------------------
def test_pool_integer_factor_is_the_block_mean():
    z = randn(2, 4, 32, 32, seed=4)
    pooled = grids.pool_latents(z, 16)
    torch.testing.assert_close(pooled, z.view(2, 4, 16, 2, 16, 2).mean((3, 5)))


@pytest.mark.parametrize("shape, crop", [((40, 32), (4, 0)), ((32, 44), (0, 6)), ((17, 20), (0, 1))])
def test_pool_keeps_aspect_by_centre_crop(shape, crop):
    z = randn(1, 4, *shape, seed=5)
    s = min(shape)
    top, left = crop
    want = F.adaptive_avg_pool2d(z[..., top:top + s, left:left + s], 16)
    torch.testing.assert_close(grids.pool_latents(z, 16), want, rtol=0, atol=0)


def test_pool_model_equals_pooled_latents_at_the_trained_grid():
    model = load()
    z = randn(2, 4, 40, 32, seed=6)
    got = model.encode_latents(z, resize="pool")
    want = model.encode_latents(grids.pool_latents(z, LATENT))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # any size, not only whole patches
    assert model.encode_latents(randn(1, 4, 18, 23), resize="pool").shape == (1, TINY["embed_dim"])


# -- exact no-ops at the trained grid ------------------------------------------------------------------
def test_policies_are_exact_no_ops_at_the_trained_grid():
    model = load()
    z = randn(3, 4, LATENT, LATENT, seed=7)
    tower = model.visual.latent_vit
    assert tower.pos_embed_for((4, 4)) is tower.positional_embedding
    assert grids.pool_latents(z, LATENT) is z
    base = model.encode_latents(z)
    for policy in ("interpolate", "pool"):
        assert torch.equal(model.encode_latents(z, resize=policy), base)


# -- gradients ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy, shape", [("interpolate", (8, 12)), ("pool", (20, 24)), ("pool", (10, 9))])
def test_gradients_reach_the_latents(policy, shape):
    model = load().double()
    z = randn(1, 4, *shape, seed=8, dtype=torch.float64).requires_grad_()
    w = randn(1, TINY["embed_dim"], seed=9, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: (model.encode_latents(x, resize=policy) * w).sum(), (z,),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["interpolate", "pool"])
def test_reward_gradients_at_1024px_shapes(policy):
    model = load(resize=policy)
    reward = fastlclip.LatentCLIPReward(model)
    z = randn(2, 4, 40, 32, seed=10).requires_grad_()
    loss = reward(z, PROMPT)
    (g,) = torch.autograd.grad(loss, z)
    assert g.shape == z.shape and torch.isfinite(g).all() and g.abs().sum() > 0
    # the reward's loss is the model's cosine in the CLIP form
    with torch.no_grad():
        cos = (model.encode_latents(z) * reward.text_features([PROMPT])).sum(-1)
    torch.testing.assert_close(loss.detach(), (100 - model.logit_scale.exp() * cos).mean())


# -- the positional-table cache -------------------------------------------------------------------------
def test_pos_table_is_cached_and_recomputed_after_the_weights_change():
    model = load()
    tower = model.visual.latent_vit
    tower.requires_grad_(False)
    a = tower.pos_embed_for((8, 8))
    assert tower.pos_embed_for((8, 8)) is a  # cached
    with torch.no_grad():
        tower.positional_embedding.mul_(2.0)  # an optimizer step / load_state_dict: in place
    b = tower.pos_embed_for((8, 8))
    assert b is not a
    torch.testing.assert_close(b, grids.resize_pos_embed(tower.positional_embedding, (8, 8)), rtol=0, atol=0)
    model.load_state_dict(load().state_dict())
    torch.testing.assert_close(tower.pos_embed_for((8, 8)),
                               grids.resize_pos_embed(tower.positional_embedding, (8, 8)), rtol=0, atol=0)
    model.double()  # new tensors, new dtype
    c = tower.pos_embed_for((8, 8))
    assert c.dtype == torch.float64 and all(k[1] == torch.float64 for k in tower._pos_cache)


def test_pos_table_under_inference_mode_is_usable_outside_it():
    model = load()
    model.requires_grad_(False)
    z = randn(1, 4, 32, 32)
    with torch.inference_mode():
        model.encode_latents(z, resize="interpolate")
    table = model.visual.latent_vit.pos_embed_for((8, 8))
    assert not table.is_inference()
    x = z.clone().requires_grad_()
    model.encode_latents(x, resize="interpolate").sum().backward()
    assert x.grad is not None


def test_training_the_positions_at_another_grid_is_not_cached():
    model = load()  # weights require grad (not frozen by a reward)
    tower = model.visual.latent_vit
    for _ in range(2):  # a stale cached autograd graph would fail the second backward
        model.encode_latents(randn(1, 4, 32, 32), resize="interpolate").sum().backward()
    assert tower.positional_embedding.grad is not None and tower.positional_embedding.grad.abs().sum() > 0
    assert not tower._pos_cache


# -- policy plumbing and errors --------------------------------------------------------------------------
def test_none_names_both_options():
    model = load()
    with pytest.raises(ValueError, match="resize='interpolate'.*resize='pool'") as e:
        model.encode_latents(randn(1, 4, 32, 32))
    assert "32x32" in str(e.value) and "16x16" in str(e.value)


def test_interpolate_refuses_partial_patches():
    model = load(resize="interpolate")
    with pytest.raises(ValueError, match="multiples of the patch size 4.*resize='pool'"):
        model.encode_latents(randn(1, 4, 18, 16))


def test_bad_policy_values():
    with pytest.raises(ValueError, match="resize must be"):
        load(resize="bicubic")
    model = load()
    with pytest.raises(ValueError, match="resize must be"):
        model.encode_latents(randn(1, 4, 16, 16), resize="crop")
    with pytest.raises(ValueError, match="resize must be"):
        fastlclip.LatentCLIPReward(model, resize="crop")


def test_load_sets_the_default_and_calls_override_it():
    model = load(resize="pool")
    assert model.resize == "pool"
    z = randn(1, 4, 32, 32)
    assert model.encode_latents(z).shape == (1, TINY["embed_dim"])
    with pytest.raises(ValueError, match="resize="):
        model.encode_latents(z, resize=None)
    a = model.encode_latents(z, resize="interpolate")
    b = model.encode_latents(z)
    assert not torch.allclose(a, b)  # the two policies are different functions
    with pytest.raises(ValueError, match="resize="):
        fastlclip.LatentCLIPReward(model, resize=None)(z, PROMPT)


def test_zero_shot_and_safety_at_other_grids():
    model = load(resize="interpolate")
    z = randn(2, 4, 32, 24)
    clf = fastlclip.ZeroShotClassifier(model, ["cat", "dog"], ["a photo of a {}."])
    assert clf.probs(z).shape == (2, 2) and clf.predict(z, resize="pool").shape == (2,)
    check = fastlclip.LatentSafetyChecker(model, blank="zeros", thresholds=-2.0)(z)
    assert check.scores.shape[0] == 2 and check.latents.shape == z.shape
    guide = fastlclip.SafetyGuidance(model, resize="pool")
    x = z.clone().requires_grad_()
    guide(x, PROMPT).backward()
    assert x.grad.abs().sum() > 0


def test_encode_images_at_other_sizes():
    model = load()
    vae = tiny_vae()
    px = torch.rand(1, 3, 256, 192)
    with pytest.raises(ValueError, match="resize='interpolate' or resize='pool'"):
        model.encode_images(px, vae=vae)
    assert model.encode_images(px, vae=vae, resize="pool").shape == (1, TINY["embed_dim"])


# -- fast paths at the new lengths, against eager float64 ------------------------------------------------
def _eager64(model, z, policy):
    m64 = load().double()
    m64.load_state_dict(model.state_dict())
    return _step(m64, z.double(), policy)


def _step(model, z, policy):
    x = z.detach().clone().requires_grad_()
    loss = fastlclip.LatentCLIPReward(model, resize=policy)(x, PROMPT)
    (g,) = torch.autograd.grad(loss, x)
    with torch.no_grad():
        feats = model.encode_latents(x, normalize=False, resize=policy)
    return loss.detach(), g, feats


def _assert_matches(got, want, tol):
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("shape", [(32, 32), (40, 24)])
def test_triton_kernels_at_other_grids_match_float64(shape):
    from fastlclip.kernels.launch import kernels_available

    if not kernels_available("cpu"):
        pytest.skip("the Triton kernels do not run here (no GPU, TRITON_INTERPRET unset)")
    model = load(backend="triton")
    z = randn(2, 4, *shape, seed=11)
    _assert_matches(_step(model, z, "interpolate"), _eager64(model, z, "interpolate"), 2e-4)


def test_graph_runtime_is_keyed_by_grid():
    model = load()
    rt = runtime.install(model, runtime.GraphRuntime(model, (1, 2), emulate=True)).runtime
    for shape in [(16, 16), (32, 32), (40, 24), (32, 32)]:
        z = randn(2, 4, *shape, seed=sum(shape))
        _assert_matches(_step(model, z, "interpolate"), _eager64(model, z, "interpolate"), 1e-4)
    # per grid: reward with grad + tower without grad; (32, 32) the second time is replayed
    assert rt.stats.captures == 3 * 2
    z = randn(2, 4, 40, 24, seed=1)
    _assert_matches(_step(model, z, "pool"), _eager64(model, z, "pool"), 1e-4)
    assert rt.stats.captures == 3 * 2  # pooled to the trained grid: its graphs


def test_compiled_runtime_is_keyed_by_grid():
    model = load()
    rt = runtime.install(model, runtime.CompiledRuntime(model, (2,), compiler="eager")).runtime
    for shape in [(16, 16), (32, 24)]:
        z = randn(2, 4, *shape, seed=sum(shape))
        _assert_matches(_step(model, z, "interpolate"), _eager64(model, z, "interpolate"), 1e-4)
    compiles = rt.stats.compiles
    assert compiles == 2 * 2  # (reward, tower) per grid
    with torch._dynamo.config.patch(error_on_recompile=True):
        for shape in [(16, 16), (32, 24)]:
            _step(model, randn(2, 4, *shape), "interpolate")
    assert rt.stats.compiles == compiles


# -- on a GPU: the real kernels, CUDA graphs and Inductor at SDXL 1024 px ----------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "graph", "compile"])
@pytest.mark.parametrize("shape", [(128, 128), (144, 112)])
def test_gpu_backends_at_1024px_match_eager(backend, shape):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        model = fastlclip.load("Latent-ViT-B-8-512", device="cuda", dtype=torch.bfloat16, resize="interpolate")
    x = torch.randn(2, 4, *shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16()

    def step():
        z = x.detach().clone().requires_grad_()
        loss = fastlclip.LatentCLIPReward(model)(z, PROMPT)
        return loss.detach().float(), torch.autograd.grad(loss, z)[0].float()

    want_loss, want_grad = step()
    model.set_backend(backend, **({"buckets": (2,)} if backend != "triton" else {}))
    for _ in range(2):  # capture / compile, then replay
        loss, grad = step()
    assert abs(loss.item() - want_loss.item()) < 0.05
    assert F.cosine_similarity(grad.flatten(), want_grad.flatten(), dim=0) >= 0.999


def test_forward_passes_the_resize_policy():
    model = load()
    x = torch.randn(2, 4, 24, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        img, _, _ = model(x, resize="interpolate")
        torch.testing.assert_close(img, model.encode_latents(x, resize="interpolate"))
        with pytest.raises(ValueError, match="resize="):
            model(x)


def test_a_rewards_own_resize_overrides_the_models_default():
    model = load()  # default resize=None: other grids are refused unless the reward says how
    x = torch.randn(1, 4, 24, 16, generator=torch.Generator().manual_seed(6))
    reward = fastlclip.LatentCLIPReward(model, resize="interpolate")
    with torch.no_grad():
        img = F.normalize(model.encode_latents(x, normalize=False, resize="interpolate").float(), dim=-1)
        torch.testing.assert_close(reward.image_features(x), img)


# -- gaps found by mutation testing (issue 22 section 5) ----------------------------------------------------------
def test_pool_to_a_single_position_is_the_mean_of_the_centre_square():
    z = randn(2, 4, 6, 10, seed=7, dtype=torch.float64)
    want = z[..., :, 2:8].mean(dim=(-2, -1), keepdim=True)  # the 6x6 centre crop of 6x10
    torch.testing.assert_close(grids.pool_latents(z, 1), want, rtol=0, atol=1e-12)
