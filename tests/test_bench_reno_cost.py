"""bench.reno_cost without a GPU: the CPU smoke run, GPU profiles, the floor and the derived figures."""

import json

import pytest
import torch

from bench import flops, profiles, reno_cost, reno_pipelines
from bench.rewards import REWARDS
from test_bench_cli import _one_line_error

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke path")


@pytest.fixture(scope="module")
def all_profiles():
    return profiles.load_profiles()


@needs_no_cuda
def test_cpu_smoke_run_writes_results_and_labels_the_floor(tmp_path, capsys, all_profiles):
    argv = ["--rewards", "latent-b8", "pixel-b32", "taesd-b32", "--pipelines", "reno", "fast", "--out", str(tmp_path)]
    report = reno_cost.main(argv)
    out = capsys.readouterr().out
    assert "CPU SMOKE TEST on tiny configs" in out and "nothing is timed" in out
    assert "FLOOR per iteration" in out and "NOT a measurement" in out
    assert "No CUDA device" in out

    folder = tmp_path / "cpu-smoke"
    for ext in ("json", "md", "png"):
        assert (folder / f"reno_cost.{ext}").stat().st_size > 0
    saved = json.loads((folder / "reno_cost.json").read_text())
    assert saved["command"] == "python -m bench.reno_cost " + " ".join(argv)
    assert saved["device"] is None and saved["mode"] == "cpu-smoke"
    assert saved["weights"]["statement"] == "random weights"
    assert {"torch", "diffusers", "open_clip"} <= set(saved["versions"]) and saved["date"]
    assert saved["targets"] == "not measured"
    keys = [("reno", "latent-b8"), ("reno", "pixel-b32"), ("reno", "taesd-b32"),
            ("fast", "latent-b8"), ("fast", "pixel-b32"), ("fast", "taesd-b32")]
    assert [(r["pipeline"], r["reward"]) for r in saved["results"]] == keys
    for row in saved["results"]:
        assert "losses finite: yes" in row["smoke"]
        assert row["seconds_per_image"] == row["usd_per_1000_images"] == "not measured"
        assert row["gradient_checkpointing"] is False
        decoded = row["reward"] != "latent-b8"
        assert ("vae_fwd" in row["smoke"] and "vae_bwd" in row["smoke"]) == decoded
        # ReNO re-encodes the prompt and syncs with the host every iteration; fast does neither
        assert ("text_enc" in row["smoke"] and "host_sync" in row["smoke"]) == (row["pipeline"] == "reno")
    assert {r["decoder"] for r in saved["results"]} == {None, "vae", "taesd"}
    assert set(saved["floors"]) == set(all_profiles)  # --gpu auto without a GPU: a floor for every profile
    h100 = {(e["pipeline"], e["reward"]): e for e in saved["floors"]["h100"]}
    for p in ("reno", "fast"):  # the tiny decoder's rows are in the floors, between the two
        assert 0 < h100[p, "latent-b8"]["floor_s_per_image"] < h100[p, "taesd-b32"]["floor_s_per_image"] \
            < h100[p, "pixel-b32"]["floor_s_per_image"]
        # the reno pipeline runs the text encoders every iteration: more work than fast for the same reward
        assert h100["reno", "latent-b8"]["gflop_per_iteration"] > h100["fast", "latent-b8"]["gflop_per_iteration"]
    components = {c["component"] for c in saved["decoder_floors"]["h100"]}
    assert {"TAESD-XL decode 512 px", "TAESD-XL decode 1024 px", "SDXL VAE decode 1024 px"} <= components
    assert [h["value"] for h in saved["headlines"]] == ["not measured"] * len(reno_cost.HEADLINES)
    assert "Where Latent-CLIP wins and where it does not" in saved["where_latent_clip_wins"]
    assert "NOT a measurement" in (folder / "reno_cost.md").read_text()
    assert report["floor_iterations"] == 50


@needs_no_cuda
def test_cpu_smoke_with_a_named_profile_floors_only_that_one(tmp_path, capsys):
    report = reno_cost.main(["--gpu", "l4", "--rewards", "latent-b8", "--pipelines", "fast", "--iterations", "1",
                             "--out", str(tmp_path)])
    assert list(report["floors"]) == ["l4"]
    assert "floor for profile l4" in capsys.readouterr().out
    assert report["floor_iterations"] == 1


@needs_no_cuda
def test_cpu_smoke_at_1024_px_runs_and_floors_the_decode_share(tmp_path, capsys):
    report = reno_cost.main(["--gpu", "h100", "--resolution", "1024", "--rewards", "latent-b8", "pixel-b32",
                             "--pipelines", "fast", "--iterations", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    settings = report["settings"]
    assert settings["floor_resolution"] == "1024x1024" and settings["one_step_preset"] == "sdxl-lightning-1step"
    assert settings["resolution"].startswith("128x128 (tiny")  # twice the tiny side: the tiny tower's grid doubled
    assert all("losses finite: yes" in r["smoke"] for r in report["results"])
    assert "decode share" in out and "NOT a measurement" in out
    shares = {r["resolution"]: r for r in report["decode_shares"] if r["reward"] == "pixel-b32" and r["profile"] == "h100"}
    assert set(shares) == {512, 1024}
    # the decode costs about 4x the FLOPs at 4x the pixels, and about 4x the floor; its share of the
    # iteration stays near 60% on compute-bound profiles because the UNet grows as fast (see the README)
    ratio = shares[1024]["decode_tflop_per_iteration"] / shares[512]["decode_tflop_per_iteration"]
    assert 3.5 < ratio < 5 and shares[1024]["decode_floor_ms"] > 3.5 * shares[512]["decode_floor_ms"]
    assert 0.5 < shares[1024]["decode_share"] < 0.7
    h100 = {e["reward"]: e for e in report["floors"]["h100"]}
    assert 0 < h100["latent-b8"]["floor_s_per_image"] < h100["pixel-b32"]["floor_s_per_image"]
    assert h100["latent-b8"]["decode_share"] == 0 < h100["pixel-b32"]["decode_share"]


def test_latent_tower_work_at_1024_px_counts_the_interpolated_grid():
    trained = flops.latent_tower_work("Latent-ViT-B-8-512", False)
    at_1024 = flops.iteration_work("latent", "Latent-ViT-B-8-512", False, resolution=1024)[1]
    assert at_1024.total_flops > 4 * trained.total_flops  # 257 tokens vs 65: linear layers 4x, attention 16x
    assert flops.iteration_work("latent", "Latent-ViT-B-8-512", False, resolution=512)[1] == trained


def test_profiles_have_sourced_peaks_and_prices(all_profiles):
    assert {"a100", "h100", "h200", "l4", "rtx4090"} <= set(all_profiles)
    for p in all_profiles.values():
        assert p.peak_bf16_tflops > 0 and p.memory_bandwidth_tbs > 0 and p.memory_gb > 0 and p.spec_source
        if p.price_per_hour_usd is not None:
            assert p.price_source and p.price_date
    assert all_profiles["h100"].peak_bf16_tflops == 989 and all_profiles["h200"].memory_bandwidth_tbs == 4.8


@pytest.mark.parametrize("device, expected", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA L4", "l4"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA H100 PCIe", None), ("NVIDIA A100-SXM4-40GB", None), ("NVIDIA GeForce RTX 4090 D", None), ("Tesla T4", None),
])
def test_profile_detection(all_profiles, device, expected):
    found = profiles.detect(device, all_profiles)
    assert (found.name if found else None) == expected


def test_mismatch_is_said_plainly_and_figures_keep_their_gpu(all_profiles):
    sel = profiles.select("h100", "NVIDIA H200", all_profiles)
    assert sel.measured.name == "h200" and [p.name for p in sel.floor] == ["h100", "h200"]
    assert "You asked for --gpu h100" in sel.message and "never as h100's" in sel.message

    sel = profiles.select("a100", "NVIDIA A10G", all_profiles)
    assert sel.measured is None and "no profile" in sel.message

    sel = profiles.select("auto", "NVIDIA H100 80GB HBM3", all_profiles)
    assert sel.measured.name == "h100" and "Detected" in sel.message
    with pytest.raises(ValueError, match="unknown GPU profile"):
        profiles.select("v100", None, all_profiles)


def test_bad_profile_files_get_clear_errors(tmp_path, all_profiles):
    good = json.loads((profiles.PROFILES_DIR / "l4.json").read_text())
    (tmp_path / "l4.json").write_text(json.dumps({k: v for k, v in good.items() if k != "memory_gb"}))
    with pytest.raises(ValueError, match="lacks .*memory_gb"):
        profiles.load_profiles(tmp_path)
    (tmp_path / "l4.json").write_text(json.dumps({**good, "price_per_hour_usd": None, "price_date": None}))
    assert profiles.load_profiles(tmp_path)["l4"].price_per_hour_usd is None
    (tmp_path / "l4.json").write_text(json.dumps({**good, "price_date": None}))
    with pytest.raises(ValueError, match="price_date"):
        profiles.load_profiles(tmp_path)


def _measured(pipeline, reward, seconds, peak):
    return {"pipeline": pipeline, "reward": reward, "seconds_per_image": seconds, "peak_allocated_gib": peak}


def test_prices_savings_and_targets_from_measured_rows(all_profiles):
    rows = [_measured("reno", "pixel-b32", 12.0, 20.0), _measured("reno", "latent-b8", 4.0, 12.0),
            _measured("fast", "pixel-b32", 3.0, 30.0), _measured("fast", "latent-b8", 2.0, 25.0),
            _measured("fast", "latent-b8", 1.0, 24.0)]
    h100 = all_profiles["h100"]
    reno_cost.add_savings(rows, h100)
    assert rows[1]["saved_vs_pixel_b32_pct"] == pytest.approx(100 * (1 - 4 / 12))
    assert rows[0]["usd_per_1000_images"] == pytest.approx(h100.price_per_hour_usd * 12.0 / 3600 * 1000)
    unpriced = [_measured("fast", "pixel-b32", 3.0, 1.0)]
    reno_cost.add_savings(unpriced, None)
    assert unpriced[0]["usd_per_1000_images"].startswith("no profile")

    targets = {t["target"]: t for t in reno_cost.evaluate_targets(rows, "NVIDIA H100 80GB HBM3")}
    assert targets["fast: latent-b8 cheaper per image than pixel-b32"]["value"] == "3.00x"  # the fastest backend
    assert targets["fast: latent-b8 cheaper per image than pixel-b32"]["met"]
    assert targets["reno: latent-b8 peak VRAM (allocated) lower than pixel-b32"]["value"] == "40.0%"
    assert not targets["fast: latent-b8 peak VRAM (allocated) lower than pixel-b32"]["met"]
    assert targets["latent-b8: fast pipeline cheaper per image than reno"]["value"] == "4.00x"
    assert targets["pixel-b32: fast pipeline cheaper per image than reno"]["met"] is True

    heads = {h["ratio"]: h for h in reno_cost.headline_ratios(rows)}
    paper = heads["Latent-ViT-B/8 vs decode + CLIP ViT-B/32 inside reno (the paper's comparison; paper: 1.27x)"]
    assert paper["value"] == pytest.approx(3.0) and paper["peak_allocated_gib"] == (20.0, 12.0)
    switch = heads["fast Latent-ViT-B/8 vs reno decode + CLIP ViT-B/32 (a ReNO user switching)"]
    assert switch["value"] == pytest.approx(12.0) and switch["seconds_per_image"] == (12.0, 1.0)
    assert heads["Latent-ViT-B/8 vs TAESD-XL decode + CLIP ViT-B/32 inside fast"]["value"] == "not measured"
    assert "12.00x" in reno_cost.headline_table(list(heads.values()))


def test_floor_is_a_roofline_over_components(all_profiles):
    p = all_profiles["h100"]
    compute_bound = flops.Work("a", forward_flops=10**12, total_flops=3 * 10**12, weight_bytes=10**6)
    memory_bound = flops.Work("b", forward_flops=10**6, total_flops=2 * 10**6, weight_bytes=10**9)
    f = flops.floor([compute_bound, memory_bound], p, iterations=50)
    full = 3e12 / 989e12 + 2e9 / 3.35e12
    last = 1e12 / 989e12 + 1e9 / 3.35e12
    assert f.per_iteration_s == pytest.approx(full)
    assert f.per_image_s == pytest.approx(49 * full + last)


def test_counted_work_matches_the_reference_counts():
    unet = flops.unet_work(False)
    assert unet.forward_flops / 1e12 == pytest.approx(1.59, rel=0.01)  # reference: 1.59 TFLOP at 512 px
    assert unet.weight_bytes == pytest.approx(2 * 2.567e9, rel=0.001)
    latent = flops.latent_tower_work(REWARDS["latent-b8"].model, False)
    assert latent.forward_flops / 1e9 == pytest.approx(11.1, rel=0.02)  # ~11.1 GFLOP, 65 tokens
    assert latent.weight_bytes == pytest.approx(2 * 85.7e6, rel=0.01)
    # frozen weights: the backward is the input gradient only, about one more forward
    assert 1.9 < latent.total_flops / latent.forward_flops < 2.1
    assert flops.latent_tower_work(REWARDS["latent-b8"].model, True).total_flops == pytest.approx(
        latent.total_flops + latent.forward_flops, rel=0.01)  # checkpointing recomputes the forward once


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measured_run_is_self_consistent(tmp_path):
    report = reno_cost.main(["--iterations", "4", "--images", "2", "--warmup", "2", "--rewards", "latent-b8", "pixel-b32",
                             "--out", str(tmp_path)])
    assert report["mode"] == "measured" and report["device"] == torch.cuda.get_device_name()
    for row in report["results"]:
        assert isinstance(row["seconds_per_image"], float) and row["peak_allocated_gib"] > 0
        phases = row["breakdown_ms"]
        assert {"unet_fwd", "reward_fwd", "reward_bwd", "unet_bwd", "optimizer"} <= set(phases)
        assert ({"vae_fwd", "vae_bwd"} <= set(phases)) == (row["kind"] == "pixel")
        # phases tile the iteration; 3 full iterations and a forward-only one make up the image
        assert sum(phases.values()) == pytest.approx(row["iteration_ms_median"], rel=0.2)
        assert 3 * row["iteration_ms_median"] / 1000 < row["seconds_per_image"] < 4.5 * row["iteration_ms_median"] / 1000
    assert isinstance(report["targets"], list) and report["targets"]


def test_optimizer_text_follows_reno_optimize_defaults(monkeypatch):
    from fastlclip import reno

    assert reno_pipelines.optimizer_text() == "SGD lr 5, Nesterov momentum 0.9, grad-norm clip 0.1, norm regulariser 0.01"

    def changed(generator, rewards, prompt, *, iterations=50, lr=2.5, momentum=0.5, nesterov=False, grad_clip=None,
                reg_weight=0.1, **kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(reno, "optimize", changed)
    assert reno_pipelines.optimizer_text() == "SGD lr 2.5, momentum 0.5, no grad-norm clip, norm regulariser 0.1"


def test_out_of_memory_with_checkpointing_too_is_an_error_row_not_a_crash(monkeypatch):
    calls = []

    def out_of_memory(pipeline, generator, reward, args, checkpointing):
        calls.append(checkpointing)
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(calls)} GiB.\nmore advice")

    monkeypatch.setattr(reno_pipelines, "_measure", out_of_memory)
    result, checkpointing = reno_pipelines._measure_config(None, None, None, "fast")
    assert calls == [False, True] and checkpointing
    assert result["error"] == "out of memory, with gradient checkpointing too"
    assert result["error_detail"] == ("without checkpointing: CUDA out of memory. Tried to allocate 1 GiB.; "
                                      "with it: CUDA out of memory. Tried to allocate 2 GiB.")

    spec = REWARDS["latent-b8"]
    row = {**reno_pipelines._row("fast", spec, "graph", checkpointing), "variant": "fast", **result}
    rows = [row, {**reno_pipelines._row("fast", REWARDS["pixel-b32"], "eager", False), "variant": "fast",
                  **_measured("fast", "pixel-b32", 3.0, 1.0)}]
    reno_cost.add_savings(rows, None)
    assert "out of memory, with gradient checkpointing too" in reno_cost.cost_table(rows)
    assert "out of memory, with gradient checkpointing too" in reno_cost.breakdown_table(rows)
    assert reno_cost.error_notes(rows) == [
        "fast Latent-ViT-B/8 graph +ckpt: out of memory, with gradient checkpointing too (without checkpointing: CUDA "
        "out of memory. Tried to allocate 1 GiB.; with it: CUDA out of memory. Tried to allocate 2 GiB.)"]
    assert json.loads(json.dumps(rows, default=str))[0]["error_detail"].startswith("without checkpointing")
    assert reno_cost.evaluate_targets(rows, "NVIDIA H100 80GB HBM3") == []

    calls.clear()
    result, checkpointing = reno_pipelines._measure_config(None, None, None, "reno")
    assert calls == [False] and not checkpointing  # ReNO never checkpoints in effect: no retry with it
    assert result == {"error": "out of memory", "error_detail": "CUDA out of memory. Tried to allocate 1 GiB."}


def test_out_of_memory_without_checkpointing_retries_with_it(monkeypatch):
    def measure(pipeline, generator, reward, args, checkpointing):
        if not checkpointing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return {"seconds_per_image": 1.0}

    monkeypatch.setattr(reno_pipelines, "_measure", measure)
    result, checkpointing = reno_pipelines._measure_config(None, None, None, "fast")
    assert checkpointing and result["seconds_per_image"] == 1.0 and "measured with it" in result["note"]


def _tiny_latent_clip():
    from bench import rewards as bench_rewards, tiny

    torch.manual_seed(0)
    model = bench_rewards.load_latent_clip(tiny.LATENT_CLIP, device="cpu", dtype=torch.float32, backend="eager")
    v = model.cfg.vision
    return model, torch.randn(1, v.latent_channels, v.latent_size, v.latent_size)


def test_auto_backend_uses_the_librarys_timing_and_checks_agreement(monkeypatch):
    from bench import rewards as bench_rewards
    from fastlclip import runtime

    model, latents = _tiny_latent_clip()
    ms = {"eager": 3.0, "triton": 1.0, "graph": 0.5}
    timed = []

    def time_backends(m, backends, **kw):
        assert m is model and kw == {"trials": 2, "steps": 3}
        timed.append(tuple(backends))
        return {b: ms[b] for b in backends}, {}

    monkeypatch.setattr(runtime, "time_backends", time_backends)
    best, reason = bench_rewards.fastest_agreeing_backend(model, latents, "a cat", ("triton", "graph"), trials=2, steps=3)
    assert timed == [("eager",), ("triton",), ("graph",)]
    # graph falls back to eager off CUDA: its figure is not its own; triton (interpreted) agrees with eager
    assert best == "triton" and "triton 1.00 ms" in reason and "time_backends" in reason
    assert "'graph': \"fell back: backend='graph'" in reason
    assert model.backend == "eager"

    original = model.set_backend

    def disagreeing(backend, **options):  # triton "computes" with other weights
        original(backend, **options)
        with torch.no_grad():
            model.logit_scale.add_(1.0 if backend == "triton" else 0.0)

    monkeypatch.setattr(model, "set_backend", disagreeing)
    best, reason = bench_rewards.fastest_agreeing_backend(model, latents, "a cat", ("triton",), trials=2, steps=3)
    assert best == "eager" and "'triton': 'disagrees with eager" in reason


def test_a_named_backend_loads_no_model_to_probe_it(monkeypatch):
    from bench import rewards as bench_rewards

    monkeypatch.setattr(bench_rewards, "load_latent_clip", lambda *a, **k: pytest.fail("loaded a model to probe"))
    kw = dict(device="cuda", dtype=torch.bfloat16, latent_shape=(1, 4, 64, 64), prompt="a cat")
    assert bench_rewards.choose_latent_backend("graph", REWARDS["latent-b8"], **kw) == ("graph", "backend 'graph' as asked")
    with pytest.raises(ValueError, match="unknown Latent-CLIP backend 'flash'"):  # never a silent eager run
        bench_rewards.choose_latent_backend("flash", REWARDS["latent-b8"], **kw)


@needs_no_cuda
def test_each_configuration_is_written_as_it_finishes(tmp_path, monkeypatch, capsys):
    """A run killed after its first configuration keeps that row on disk (complete: false); a finished run says
    complete: true."""
    real = reno_cost.run_smoke

    def killed_after_one(args, progress, on_row):
        def save_then_die(rows):
            on_row(rows)
            raise KeyboardInterrupt  # what a timeout's signal does to the run

        return real(args, progress, on_row=save_then_die)

    monkeypatch.setattr(reno_cost, "run_smoke", killed_after_one)
    for name in ("compute_floors", "decoder_floors"):  # counted FLOPs: other tests check them, they take long
        monkeypatch.setattr(reno_cost, name, lambda *args: {})
    monkeypatch.setattr(reno_cost, "decode_shares", lambda *args: [])
    monkeypatch.setattr(reno_cost, "where_latent_clip_wins", lambda: "")
    argv = ["--gpu", "l4", "--rewards", "latent-b8", "pixel-b32", "--pipelines", "fast", "--iterations", "1",
            "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        reno_cost.main(argv)
    saved = json.loads((tmp_path / "cpu-smoke" / "reno_cost.json").read_text())
    assert saved["complete"] is False and "1 configuration(s) finished" in saved["note"]
    assert [(r["pipeline"], r["reward"]) for r in saved["results"]] == [("fast", "latent-b8")]
    assert "losses finite: yes" in saved["results"][0]["smoke"]
    monkeypatch.setattr(reno_cost, "run_smoke", real)
    reno_cost.main(argv)
    saved = json.loads((tmp_path / "cpu-smoke" / "reno_cost.json").read_text())
    assert saved["complete"] is True and len(saved["results"]) == 2


# -- --full-size: fast-pipeline iterations at the real sizes on the CPU (tested on tiny stand-ins) -------
@pytest.mark.parametrize("argv, needles", [
    (["--full-size", "--pipelines", "reno", "fast"], ["--pipelines reno"]),
    (["--full-size", "--resolution", "1024"], ["--resolution 1024"]),
    (["--full-size", "--iterations", "5"], ["--iterations", "--repeats"]),
    (["--full-size", "--images", "2"], ["--images"]),
    (["--full-size", "--compile-unet"], ["--compile-unet"]),
    (["--full-size", "--latent-backend", "graph"], ["--latent-backend"]),
    (["--full-size", "--gpu", "h100"], ["--gpu"]),
    (["--full-size", "--preset", "sdxl-turbo", "--resize", "pool"], ["--preset", "--resize"]),
    (["--full-size", "--repeats", "0"], ["--repeats"]),
    (["--full-size", "--threads", "-2"], ["--threads"]),
    (["--repeats", "2"], ["--repeats", "only with --full-size"]),
    (["--threads", "2"], ["--threads", "only with --full-size"]),
])
def test_full_size_bad_combinations_are_one_line_errors_before_any_work(capsys, monkeypatch, argv, needles):
    def fail(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    for name in ("full_size_run", "run_smoke", "run_measured"):
        monkeypatch.setattr(reno_cost, name, fail)
    _one_line_error(capsys, reno_cost.main, argv, *needles)


@needs_no_cuda
def test_full_size_defaults_and_the_other_runs_defaults_unchanged():
    args = reno_cost.parse_args(["--full-size"])
    assert args.pipelines == ["fast"] and args.rewards == ["latent-b8", "pixel-b32", "taesd-b32"]
    assert (args.warmup, args.repeats, args.threads, args.resolution) == (1, 2, torch.get_num_threads(), 512)
    args = reno_cost.parse_args([])
    assert args.pipelines == list(reno_pipelines.PIPELINES) and args.rewards == list(REWARDS)
    assert (args.warmup, args.resolution, args.repeats) == (3, 512, None)
    assert reno_pipelines.resize_for(args) == "interpolate" and reno_pipelines.preset_for(args) == "sdxl-turbo"


@needs_no_cuda
def test_full_size_report_on_tiny_stand_ins(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(reno_cost, "STAND_INS", True)
    monkeypatch.setattr(reno_cost, "FRESH_PROCESS", False)  # bench.reward's test runs a fresh process
    threads = torch.get_num_threads()
    argv = ["--full-size", "--warmup", "0", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    report = reno_cost.main(argv)
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    assert "TINY STAND-INS" in out and "Wrote" in out
    saved = json.loads((tmp_path / "cpu" / "reno_cost.json").read_text())
    assert saved == report and saved["complete"] is True and saved["mode"] == "cpu-full-size (tiny stand-ins)"
    assert saved["command"] == "python -m bench.reno_cost " + " ".join(argv) and saved["date"]
    assert saved["device"]["name"].startswith("CPU (") and saved["device"]["torch_threads"] == 1
    assert saved["settings"]["pipeline"] == "fast" and saved["settings"]["dtype"] == "bfloat16"
    assert (saved["settings"]["warmup_iterations"], saved["settings"]["timed_iterations"]) == (0, 1)
    assert saved["seconds_per_image"].startswith("not measured")
    rows = saved["results"]
    assert [r["reward"] for r in rows] == ["latent-b8", "pixel-b32", "taesd-b32"]
    assert [r["system"] for r in rows] == ["Latent-ViT-B/8", "SDXL VAE decode + CLIP ViT-B/32",
                                           "TAESD-XL decode + CLIP ViT-B/32"]
    for r in rows:
        assert r["status"] == "ok" and r["torch_threads"] == 1 and r["latents"] == [1, 4, 8, 8]
        assert len(r["iteration_ms_each"]) == 1 and r["warmup_iteration_ms_each"] == []
        assert {"unet_fwd", "reward_fwd", "reward_bwd", "unet_bwd"} <= set(r["breakdown_ms"])
        assert ({"vae_fwd", "vae_bwd"} <= set(r["breakdown_ms"])) == (r["decoder"] is not None)
        assert 0 < r["reward_share"] < 1 and r["peak_rss_gib"] > 0
        assert r["load_average_1_5_15_min_at_end"] is None or len(r["load_average_1_5_15_min_at_end"]) == 3
        assert r["iteration_time_vs_latent"] == pytest.approx(r["iteration_ms"] / rows[0]["iteration_ms"])
    assert rows[0]["iteration_time_vs_latent"] == 1.0 and rows[0]["relative_to"] == "Latent-ViT-B/8"
    assert "| SDXL VAE decode + CLIP ViT-B/32" in out


def test_cpu_phase_timer_attributes_the_gaps():
    timer = reno_pipelines.CpuPhaseTimer()
    for _ in range(2):
        for name in ("unet_fwd", "reward_fwd", "optimizer", "reward_bwd", "unet_bwd", "optimizer"):
            timer.phase(name)
        timer.end_iteration()
    its = timer.durations_ms()
    assert len(its) == 2 and timer.iterations[0][-1] == "optimizer"
    for it in its:  # "optimizer" marked twice: summed into one entry
        assert list(it) == ["unet_fwd", "reward_fwd", "optimizer", "reward_bwd", "unet_bwd"]
        assert all(v >= 0 for v in it.values())
