"""End to end on CPU (issue 32, part 6): a tiny teacher set (tests/ensemble_world.py: an open_clip teacher, a
transformers one, an aesthetic MLP on the first) over a tiny 16-channel VAE, training targets and a separate
evaluation folder with several samples per prompt (so within-prompt pairs exist), a multi-head student trained a
few hundred steps with ``distill.train(teachers=...)``, then ``python -m fastlclip.distill eval`` with the teacher
set: the table, the JSON report, and the student against the mean-embedding baseline per head."""

from __future__ import annotations

import json

import pytest
import torch

import fastlclip
from distill_world import STUDENT, make_vae
from ensemble_world import prompt_shards, teacher_files
from fastlclip.distill import make_targets, train
from fastlclip.distill.__main__ import main

PROMPTS = ["a red square", "a blue thing", "green", "a photo of a dog", "an orange cat on a mat",
           "a yellow wall", "dark", "a bright sky"]
PER_PROMPT = 6  # evaluation samples per prompt: 15 pairs per group


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens_eval")
    vae = make_vae()
    files = teacher_files(d, vae)
    specs = files["specs"]
    shards = prompt_shards(vae, d / "shards", 160, 80, lambda i: PROMPTS[i % len(PROMPTS)], seed=2)
    make_targets(shards, d / "targets", vae=vae, teachers=specs, batch_size=80, progress=False)
    n_eval = len(PROMPTS) * PER_PROMPT
    held = prompt_shards(vae, d / "eval_shards", n_eval, n_eval, lambda i: PROMPTS[i // PER_PROMPT], seed=3)
    make_targets(held, d / "eval_targets", vae=vae, teachers=specs, batch_size=n_eval, progress=False)
    final = train(d / "targets", d / "run", student=STUDENT, teachers=specs, steps=300, batch_size=32, lr=2e-3,
                  warmup_steps=20, seed=0, save_every=300, holdout=0.0, reward_weight=0.5, progress=False,
                  device="cpu")
    return {"dir": d, "specs": specs, "args": files["spec_args"], "final": final}


def _eval(world, *extra):
    d = world["dir"]
    return main(["eval", str(world["final"]), str(d / "eval_targets"), *world["args"], "--holdout", "0",
                 "--train-targets", str(d / "targets"), *extra])


def test_eval_cli_reports_every_head_and_the_student_beats_the_mean_embedding(world, capsys):
    out = world["dir"] / "report" / "eval.json"
    assert _eval(world, "--head-weight", "hps=5", "--head-weight", "pick=0.05", "--out", str(out)) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["head", "cos"]
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["hps", "pick", "aes", "total"]
    report = json.loads(out.read_text())
    assert set(report["heads"]) == {"hps", "pick", "aes"} and "total" in report
    assert report["rows"] == len(PROMPTS) * PER_PROMPT and report["prompts"] == len(PROMPTS)
    assert report["baseline_mean_from"] == "train_targets" and report["holdout"] == 0
    assert report["total"]["weights"] == {"hps": 5.0, "pick": 0.05}
    figures = {}
    for h in ("hps", "pick", "aes", "total"):
        r = report["total"] if h == "total" else report["heads"][h]
        st, bl = r["student"], r["baseline"]
        figures[h] = {"cos": st.get("cosine", {}).get("mean"), "cos_b": bl.get("cosine", {}).get("mean"),
                      "rho": st["spearman"], "rho_b": bl["spearman"], "agree": st["agreement"]["agreement"],
                      "agree_b": bl["agreement"]["agreement"], "pairs": st["agreement"]["pairs"]}
        # the baseline gives one reward per prompt: it orders no pair within a group, exactly chance
        assert bl["agreement"]["agreement"] == 0.5
        assert st["agreement"]["pairs"] + st["agreement"]["teacher_ties"] == len(PROMPTS) * 15
    print("tiny end-to-end eval:", json.dumps(figures))
    for h in ("hps", "pick"):  # the CLIP heads: cosine and within-prompt ordering above the baseline
        assert figures[h]["cos"] > figures[h]["cos_b"] + 0.1, figures
        assert figures[h]["agree"] > 0.6, figures
    assert figures["total"]["agree"] > 0.55, figures
    assert report["heads"]["aes"]["cosine_of"] == "hps" and "cosine" not in report["heads"]["aes"]["student"]
    # the Python entry point gives the same report
    again = fastlclip.distill.evaluate_ensemble_file(world["final"], world["dir"] / "eval_targets", world["specs"],
                                                     {"hps": 5.0, "pick": 0.05}, holdout=0,
                                                     train_targets=world["dir"] / "targets", file=None)
    assert json.loads(json.dumps(again)) == report
    # the teachers' scores instead of ReNO's losses: each a decreasing affine map of the loss, the same orderings
    scored = fastlclip.distill.evaluate_ensemble_file(world["final"], world["dir"] / "eval_targets", world["specs"],
                                                      {"hps": 5.0, "pick": 0.05}, holdout=0, use="score",
                                                      train_targets=world["dir"] / "targets", file=None)
    assert scored["use"] == "score"
    for h in ("hps", "pick", "aes"):
        assert scored["heads"][h]["student"]["agreement"] == report["heads"][h]["student"]["agreement"]


def test_eval_cli_argument_errors(world, capsys, tmp_path):
    d, final = world["dir"], str(world["final"])

    def err(argv):
        try:
            rc = main(argv)
        except SystemExit as e:  # the parser's own errors (a bad choice): one line, exit 2 as well
            rc = e.code
        assert rc == 2
        got = capsys.readouterr().err.strip()
        assert len(got.splitlines()) == 1, got
        return got

    specs = world["args"]
    two = specs[:4]  # hps and pick, without the aesthetic head
    got = err(["eval", final, str(d / "eval_targets"), *two])
    assert "heads ['hps', 'pick', 'aes']" in got and "teacher set given is ['hps', 'pick']" in got
    got = err(["eval", final, str(d / "eval_targets"), *specs, "--head-weight", "clip=1"])
    assert "head weights name ['clip']" in got
    assert "NAME=WEIGHT" in err(["eval", final, str(d / "eval_targets"), *specs, "--head-weight", "hps"])
    assert "--classes" in err(["eval", final, str(d / "eval_targets"), *specs, "--classes", "cat"])
    assert "--out go with --teacher-spec" in err(["eval", final, str(d / "eval_targets"), "--out", "x.json"])
    assert "is an ensemble file" in err(["eval", final, str(d / "eval_targets")])
    assert "a .json file" in err(["eval", final, str(d / "eval_targets"), *specs, "--out", str(tmp_path)])
    assert "not a targets folder" in err(["eval", final, str(tmp_path), *specs])
    assert "choose from" in err(["eval", final, str(d / "eval_targets"), *specs, "--use", "loss"])
    assert not list(tmp_path.iterdir())  # nothing written by a refused command
