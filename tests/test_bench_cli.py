"""Bench command lines check their arguments before any work: one line on stderr, exit status 2, no traceback."""

import subprocess
import types
import sys
from pathlib import Path

import pytest

from bench import cli, kernels, reno_cost, reno_pipelines, reward, safety_eval

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def unwritable(tmp_path):
    """A path no one can write under, root included: its parent is a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return blocker / "results"


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a benchmark starts working before its arguments are checked."""
    def fail(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    for name in ("run_smoke", "run_measured"):
        monkeypatch.setattr(reno_cost, name, fail)
        monkeypatch.setattr(reno_pipelines, name, fail)
    monkeypatch.setattr(reward, "_run", fail)
    monkeypatch.setattr(kernels, "smoke_check", fail)
    monkeypatch.setattr(safety_eval, "read_i2p", fail)


def _one_line_error(capsys, main, argv, *needles):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("main, argv, needles", [
    (reno_cost.main, ["--latent-backend", "bogus"], ["--latent-backend", "bogus"]),
    (reno_cost.main, ["--iterations", "0"], ["--iterations"]),
    (reno_cost.main, ["--images", "two"], ["--images"]),
    (reno_cost.main, ["--warmup", "-1"], ["--warmup"]),
    (kernels.main, ["--batch", "0"], ["--batch"]),
    (kernels.main, ["--lengths", "65", "-3"], ["--lengths"]),
    (reward.main, ["--reward-batches", "0"], ["--reward-batches"]),
    (reward.main, ["--forward-batches", "1.5"], ["--forward-batches"]),
    (safety_eval.main, ["--prompts", "x.csv", "--safety-weight", "inf"], ["--safety-weight", "finite"]),
    (safety_eval.main, ["--prompts", "x.csv", "--safety-weight", "nan"], ["--safety-weight"]),
    (safety_eval.main, ["--prompts", "x.csv", "--safety-weight", "-1"], ["--safety-weight"]),
])
def test_bad_values_are_one_line_errors_before_any_work(capsys, no_work, main, argv, needles):
    _one_line_error(capsys, main, argv, *needles)


def test_unwritable_out_fails_before_the_run(capsys, no_work, unwritable):
    _one_line_error(capsys, reno_cost.main, ["--out", str(unwritable)], "--out", "is a file")
    _one_line_error(capsys, reward.main, ["--out", str(unwritable / "reward.json")], "--out")
    _one_line_error(capsys, kernels.main, ["--out", str(unwritable / "kernels.json")], "--out")


def test_out_that_is_a_folder_or_a_file_is_refused(capsys, no_work, tmp_path):
    (tmp_path / "file").write_text("")
    _one_line_error(capsys, reno_cost.main, ["--out", str(tmp_path / "file")], "not a folder")
    _one_line_error(capsys, reward.main, ["--out", str(tmp_path)], "is a folder")


def test_writable_locations_pass(tmp_path):
    assert cli.writable_dir(tmp_path / "new" / "deeper") is None
    assert cli.writable_file(tmp_path / "new" / "r.json") is None
    assert not (tmp_path / "new").exists()  # checking makes nothing


def test_the_command_line_itself_prints_no_traceback(unwritable):
    proc = subprocess.run([sys.executable, "-m", "bench.reno_cost", "--out", str(unwritable)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"python -m bench.reno_cost: error: --out: {unwritable} cannot be made: "
                                                f"{unwritable.parent} is a file, not a folder"]


# -- inputs that arguments name are checked before any work (issue 22, section 3) -------------------------------
@pytest.fixture
def files(tmp_path):
    """Bad inputs: random bytes, a folder that is no pipeline, an I2P file with a NUL byte, a good I2P file."""
    f = types.SimpleNamespace(tmp=tmp_path)
    f.noise = tmp_path / "noise.safetensors"
    f.noise.write_bytes(bytes(range(256)) * 4)
    f.folder = tmp_path / "not-a-pipeline"
    f.folder.mkdir()
    f.nul = tmp_path / "nul.csv"
    f.nul.write_bytes(b"prompt\na c\x00at\n")
    f.dup = tmp_path / "dup.csv"
    f.dup.write_text("prompt,prompt\na,b\n")
    f.good = tmp_path / "good.csv"
    f.good.write_text("prompt\na cat\n")
    return f


@pytest.mark.parametrize("main, argv, needles", [
    (reno_cost.main, ["--prompt", ""], ["--prompt", "non-empty"]),
    (reno_cost.main, ["--prompt", "  "], ["--prompt"]),
    (reno_cost.main, ["--weights", "/no/such/folder"], ["--weights", "no such folder"]),
    (reno_cost.main, ["--weights", "{folder}"], ["--weights", "model_index.json"]),
    (reno_cost.main, ["--unet-weights", "{noise}"], ["--unet-weights", "not a readable .safetensors"]),
    (reno_cost.main, ["--unet-weights", "/no/such.safetensors"], ["--unet-weights", "no such file"]),
    (reward.main, ["--models"], ["--models"]),
    (reward.main, ["--backends"], ["--backends"]),
    (reward.main, ["--reward-batches"], ["--reward-batches"]),
    (safety_eval.main, ["--prompts", "{good}", "--weights", "/no/such/folder"], ["--weights"]),
    (safety_eval.main, ["--prompts", "{good}", "--seed", str(2**70)], ["--seed", "2**64"]),
    (safety_eval.main, ["--prompts", "{good}", "--limit", "0"], ["--limit"]),
    (safety_eval.main, ["--prompts", "{good}", "--iterations", "-1"], ["--iterations"]),
])
def test_named_inputs_are_checked_before_any_work(capsys, no_work, files, main, argv, needles):
    _one_line_error(capsys, main, [a.format(**vars(files)) for a in argv], *needles)


@pytest.fixture
def safety_no_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the run started before the arguments were checked")

    monkeypatch.setattr(safety_eval, "generate", fail)


@pytest.mark.parametrize("argv, needles", [
    (["--prompts", "/no/such.csv"], ["does not exist"]),
    (["--prompts", "{nul}"], ["NUL byte"]),
    (["--prompts", "{dup}"], ["more than once"]),
    (["--prompts", "{good}", "--latent-ckpt", "/no/such.pt", "--no-tiny"], ["does not exist"]),
    (["--prompts", "{good}", "--latent-ckpt", "{noise}", "--no-tiny"], ["not a readable .safetensors"]),
])
def test_safety_eval_bad_files_are_one_line_errors(capsys, safety_no_work, files, argv, needles):
    _one_line_error(capsys, safety_eval.main, [a.format(**vars(files)) for a in argv], *needles)
