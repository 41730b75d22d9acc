"""Evaluation of a reward student for RL (issue 32, part 6): cosine, Spearman of rewards and within-group pairwise
agreement per head and for the weighted total, beside the mean-embedding baseline and chance.

Every metric is checked against small examples worked out by hand in the comments (ranks, pairs, orderings),
against brute-force loops written here for larger random ones, and on tiny teachers (one-layer open_clip CLIPs and
an aesthetic MLP, random weights, no downloads) with stand-in predictors: the teacher's own embeddings (perfect),
the teacher's plus noise (better than the baseline), and the mean embedding (exactly chance within a group)."""

from __future__ import annotations

import io
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_open_clip
from fastlclip import inputs
from fastlclip.distill import agreement as ag
from fastlclip.distill import teachers as tt
from fastlclip.distill.targets import Targets


# -- Spearman ------------------------------------------------------------------------------------------
def test_rankdata_averages_ties():
    # sorted: 1 (rank 1), 2 (rank 2), 3 3 3 (ranks 3, 4, 5 -> 4 each)
    assert ag.rankdata(torch.tensor([3.0, 1.0, 3.0, 3.0, 2.0])).tolist() == [4.0, 1.0, 4.0, 4.0, 2.0]


def test_spearman_by_hand():
    # ranks a = [1, 2.5, 2.5, 4], b = [1, 3, 2, 4]; centred (mean 2.5): a = [-1.5, 0, 0, 1.5],
    # b = [-1.5, 0.5, -0.5, 1.5]; sum ab = 4.5, sum a^2 = 4.5, sum b^2 = 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    a, b = torch.tensor([1.0, 2.0, 2.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0])
    assert ag.spearman(a, b) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert ag.spearman(b, torch.exp(b)) == pytest.approx(1.0)      # any increasing map: 1
    assert ag.spearman(b, -b ** 3) == pytest.approx(-1.0)          # any decreasing map: -1
    assert ag.spearman(b, torch.ones(4)) is None                    # a constant side: undefined
    assert ag.spearman(torch.ones(1), torch.ones(1)) is None        # one sample: undefined


# -- pairwise agreement --------------------------------------------------------------------------------
def test_pairwise_agreement_by_hand():
    # group "a" (4 rows, teacher order 0 < 2 < 3 < 1; student 0 < 2 < 1 < 3):
    #   (0,1) + +  (0,2) + +  (0,3) + +  (1,2) - -  (1,3) - +  (2,3) + +   -> 5 of 6 agree
    # group "b" (3 rows, teacher [5, 5, 7], student [1, 2, 2]):
    #   (0,1) teacher tie: excluded; (0,2) + + : 1; (1,2) + and a student tie: 1/2   -> 1.5 of 2
    # group "c": one row, no pair.  Pooled: 6.5 / 8; per group: (5/6 + 3/4) / 2
    rows = [("a", 0.1, 1.0), ("b", 5.0, 1.0), ("a", 0.4, 3.0), ("c", 9.0, -4.0), ("a", 0.2, 2.0),
            ("b", 5.0, 2.0), ("a", 0.3, 4.0), ("b", 7.0, 2.0)]
    groups = [g for g, _, _ in rows]
    t = torch.tensor([v for _, v, _ in rows], dtype=torch.float64)
    s = torch.tensor([v for _, _, v in rows], dtype=torch.float64)
    got = ag.pairwise_agreement(s, t, groups)
    assert got["agreement"] == pytest.approx(6.5 / 8)
    assert got["group_mean"] == pytest.approx((5 / 6 + 3 / 4) / 2)
    assert {k: got[k] for k in ("pairs", "teacher_ties", "student_ties", "groups", "groups_with_pairs",
                                "singletons")} == {"pairs": 8, "teacher_ties": 1, "student_ties": 1, "groups": 3,
                                                   "groups_with_pairs": 2, "singletons": 1}
    # both sides negated (losses instead of scores): the same; integer group ids: the same
    ids = torch.tensor([{"a": 7, "b": 3, "c": 11}[g] for g in groups])
    assert ag.pairwise_agreement(-s, -t, ids)["agreement"] == pytest.approx(6.5 / 8)
    # tie_tol 0.15: in group a, 0.1 / 0.2, 0.4 / 0.3 and 0.2 / 0.3 tie too; the 3 pairs left all agree
    # ((0,1) + +, (0,3) + +, (1,2) - -); group b as before: (3 + 1.5) / 5
    tol = ag.pairwise_agreement(s, t, groups, tie_tol=0.15)
    assert (tol["teacher_ties"], tol["pairs"], tol["student_ties"]) == (4, 5, 1)
    assert tol["agreement"] == pytest.approx(4.5 / 5)


def test_perfect_reversed_constant_and_singletons():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(40, generator=g, dtype=torch.float64)
    groups = torch.arange(40) // 5                                  # 8 groups of 5: 80 pairs
    perfect = ag.pairwise_agreement(torch.exp(t), t, groups)
    assert perfect["agreement"] == 1.0 and perfect["pairs"] == 80 and ag.spearman(torch.exp(t), t) == pytest.approx(1)
    reversed_ = ag.pairwise_agreement(-t, t, groups)
    assert reversed_["agreement"] == 0.0 and ag.spearman(-t, t) == pytest.approx(-1)
    const = ag.pairwise_agreement(torch.full((40,), 3.0), t, groups)
    assert const["agreement"] == 0.5 and const["student_ties"] == 80
    alone = ag.pairwise_agreement(t, t, torch.arange(40))           # every group of one row: no pair
    assert alone["agreement"] is None and alone["group_mean"] is None
    assert (alone["pairs"], alone["singletons"], alone["groups_with_pairs"]) == (0, 40, 0)


def brute_force(s, t, groups, tol=0.0):
    """The definition as loops: pairs within a group, teacher ties excluded, student ties 1/2."""
    score = counted = 0
    for i, j in itertools.combinations(range(len(t)), 2):
        if groups[i] != groups[j] or abs(t[i] - t[j]) <= tol:
            continue
        counted += 1
        ds, dt = s[i] - s[j], t[i] - t[j]
        score += 0.5 if abs(ds) <= tol else float((ds > 0) == (dt > 0))
    return score / counted


def test_pairwise_agreement_matches_loops_in_blocks(monkeypatch):
    g = torch.Generator().manual_seed(1)
    groups = torch.randint(0, 9, (150,), generator=g)               # uneven sizes
    t = torch.randint(0, 6, (150,), generator=g).double()           # many teacher ties
    s = t + torch.randint(-2, 3, (150,), generator=g).double()      # and student ties
    want = brute_force(s.tolist(), t.tolist(), groups.tolist())
    assert ag.pairwise_agreement(s, t, groups)["agreement"] == pytest.approx(want, abs=1e-12)
    monkeypatch.setattr(ag, "_PAIR_BLOCK", 7)                       # one row of pairs at a time
    assert ag.pairwise_agreement(s, t, groups)["agreement"] == pytest.approx(want, abs=1e-12)


# -- cosine, head_report, total_report -----------------------------------------------------------------
def test_cosine_stats_by_hand():
    # cosines [1, 0, 1/sqrt 2]: mean (1 + 0.70711) / 3; sorted [0, .70711, 1]: q25 at position 0.5 -> 0.35355
    pred = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    got = ag.cosine_stats(pred, target)
    r = 1 / math.sqrt(2)
    assert got["mean"] == pytest.approx((1 + r) / 3) and got["min"] == pytest.approx(0)
    assert got["q25"] == pytest.approx(r / 2) and got["q50"] == pytest.approx(r) and got["q95"] <= 1
    # one embedding for every row (the baseline): [3, 4] -> [0.6, 0.8] against [1, 0] and [0, 1]
    assert ag.cosine_stats(torch.tensor([3.0, 4.0]), torch.eye(2))["mean"] == pytest.approx(0.7)


def test_head_report_student_baseline_chance():
    # 2 prompts x 3 samples; the baseline's rewards depend on the prompt only: it ties every pair of a group
    t_emb = F.normalize(torch.randn(6, 8, generator=torch.Generator().manual_seed(2)), dim=-1)
    t_r = torch.tensor([0.3, 0.1, 0.2, 0.9, 0.7, 0.8])
    groups = ["p", "p", "p", "q", "q", "q"]
    baseline = torch.tensor([0.5, 0.5, 0.5, 0.6, 0.6, 0.6])
    rep = ag.head_report(t_emb, t_emb, t_r, t_r, groups, t_emb.mean(0), baseline_reward=baseline)
    st, bl = rep["student"], rep["baseline"]
    assert st["cosine"]["mean"] == pytest.approx(1) and st["spearman"] == pytest.approx(1)
    assert st["agreement"]["agreement"] == 1.0 and st["agreement"]["pairs"] == 6
    assert bl["agreement"]["agreement"] == 0.5 and bl["agreement"]["student_ties"] == 6
    # across prompts the baseline does order: ranks t [3, 1, 2, 6, 4, 5], b [2, 2, 2, 5, 5, 5]; centred
    # t [-.5, -2.5, -1.5, 2.5, .5, 1.5], b [-1.5]*3 + [1.5]*3: sum tb = 6.75 + 6.75 = 13.5, t^2 17.5, b^2 13.5
    assert bl["spearman"] == pytest.approx(13.5 / math.sqrt(17.5 * 13.5))
    assert bl["cosine"]["mean"] < 1 and rep["chance"] == {"cosine": 0.0, "spearman": 0.0, "agreement": 0.5}
    rev = ag.head_report(t_emb, t_emb, -t_r, t_r, groups, t_emb.mean(0))
    assert rev["student"]["agreement"]["agreement"] == 0.0 and rev["student"]["spearman"] == pytest.approx(-1)
    assert rev["baseline"]["spearman"] is None and rev["baseline"]["agreement"]["agreement"] == 0.5
    # a head with no embedding of its own (an aesthetic MLP): rewards only
    head = ag.head_report(None, None, t_r, t_r, groups, None)
    assert "cosine" not in head["student"] and head["student"]["agreement"]["agreement"] == 1.0


@pytest.mark.parametrize("where", ["student_reward", "teacher_reward", "student_emb", "baseline_reward"])
def test_non_finite_input_is_refused(where):
    args = {"student_emb": torch.ones(4, 3), "teacher_emb": torch.ones(4, 3), "student_reward": torch.arange(4.0),
            "teacher_reward": torch.arange(4.0), "groups": [0, 0, 1, 1], "train_mean_emb": torch.ones(3)}
    extra = {"baseline_reward": torch.zeros(4)}
    bad = extra if where == "baseline_reward" else args
    bad[where] = bad[where].clone()
    bad[where].view(-1)[1] = float("nan")
    with pytest.raises(ValueError, match=rf"{where} has non-finite values \(NaN or Inf\) in 1 of 4 rows \(first: row"):
        ag.head_report(**args, **extra)


def test_shapes_and_groups_are_checked():
    with pytest.raises(ValueError, match="student_reward has 3 rows, expected 4"):
        ag.pairwise_agreement(torch.zeros(3), torch.zeros(4), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="groups has 3 rows, expected 4"):
        ag.pairwise_agreement(torch.zeros(4), torch.zeros(4), [0, 0, 1])
    with pytest.raises(ValueError, match="have no group"):
        ag.pairwise_agreement(torch.zeros(2), torch.zeros(2), ["a", None])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        ag.pairwise_agreement(torch.zeros(2), torch.zeros(2), torch.zeros(2))


def test_total_report_by_hand():
    # weights a 1, b 2: teacher total [0+6, 1+0, 2+2, 3+0] = [6, 1, 4, 3]; student total [0, 1, 2, 3].
    # pairs: (0,1) - +  (0,2) - +  (0,3) - +  (1,2) + +  (1,3) + +  (2,3) - +  -> 2 of 6.
    # ranks t [4, 1, 3, 2], s [1, 2, 3, 4]; centred products -2.25 + .75 + .25 - .75 = -2; variances 5 -> -0.4
    teacher = {"a": torch.tensor([0.0, 1, 2, 3]), "b": torch.tensor([3.0, 0, 1, 0])}
    student = {"a": torch.tensor([0.0, 1, 2, 3]), "b": torch.zeros(4)}
    rep = ag.total_report(student, teacher, {"a": 1.0, "b": 2.0}, ["x"] * 4)
    assert rep["student"]["agreement"]["agreement"] == pytest.approx(2 / 6)
    assert rep["student"]["spearman"] == pytest.approx(-0.4)
    assert rep["baseline"]["agreement"]["agreement"] == 0.5 and rep["chance"] == {"spearman": 0.0, "agreement": 0.5}
    # with weight b 0 the total is head a: the student is perfect
    assert ag.total_report(student, teacher, {"a": 1.0, "b": 0.0}, ["x"] * 4)["student"]["spearman"] == pytest.approx(1)
    with pytest.raises(ValueError, match="not in the ensemble: \\['c'\\]"):
        ag.total_report(student, teacher, {"c": 1.0}, ["x"] * 4)
    with pytest.raises(ValueError, match="not all zero"):
        ag.total_report(student, teacher, {"a": 0.0}, ["x"] * 4)


# -- evaluate_ensemble on tiny teachers ----------------------------------------------------------------
PROMPTS = [f"a photo of thing number {i}" for i in range(10)]


@pytest.fixture(scope="module")
def ensemble():
    hps = tt.OpenCLIPTeacher("hps", tiny_open_clip(3), reward="hps")
    clip = tt.OpenCLIPTeacher("clip", tiny_open_clip(5), reward="clip")
    torch.manual_seed(4)
    aes = tt.AestheticTeacher("aes", hps, tt.AestheticMLP((32, 16, 8, 8, 4, 1)))
    return {"hps": hps, "clip": clip, "aes": aes}


def make_rows(n_per_prompt=6, seed=0, prompts=PROMPTS):
    """Targets in memory: 10 prompts x 6 samples, random unit embeddings per teacher; each latent holds its row
    index, so a stand-in predictor can look its row up."""
    g = torch.Generator().manual_seed(seed)
    n = len(prompts) * n_per_prompt
    cols = {name: F.normalize(torch.randn(n, 32, generator=g), dim=-1).half() for name in ("hps", "clip")}
    latents = torch.arange(n, dtype=torch.float16).view(n, 1, 1, 1).expand(n, 4, 2, 2).contiguous()
    return Targets([f"k{i:04d}" for i in range(n)], latents, cols["hps"], {}, cols, {},
                   [prompts[i // n_per_prompt] for i in range(n)])


def lookup(rows, noise=0.0, seed=9):
    g = torch.Generator().manual_seed(seed)
    noisy = {k: v.float() + noise * torch.randn(v.shape, generator=g) for k, v in rows.columns.items()}

    def predict(latents):
        idx = latents[:, 0, 0, 0].long().cpu()
        return {k: v[idx] for k, v in noisy.items()}
    return predict


WEIGHTS = {"hps": 5.0, "clip": 0.01, "aes": 0.05}


def test_evaluate_ensemble_perfect_noisy_and_baseline(ensemble, tmp_path):
    rows = make_rows()
    out = io.StringIO()
    rep = ag.evaluate_ensemble(lookup(rows), rows, ensemble, WEIGHTS, holdout=0, batch_size=16,
                               out=tmp_path / "eval.json", file=out)
    assert rep["rows"] == 60 and rep["prompts"] == 10 and rep["baseline_mean_from"] == "evaluated rows"
    assert json.loads((tmp_path / "eval.json").read_text()) == json.loads(json.dumps(rep))
    table = out.getvalue()
    assert all(name in table for name in ("hps", "clip", "aes", "total", "mean-embedding baseline"))
    for name, r in [*rep["heads"].items(), ("total", rep["total"])]:
        st, bl = r["student"], r["baseline"]
        assert st["agreement"]["agreement"] == 1.0 and st["spearman"] == pytest.approx(1), name
        assert st["agreement"]["pairs"] + st["agreement"]["teacher_ties"] == 10 * 15, name
        # the baseline orders nothing within a prompt: every counted pair a student tie, exactly chance
        assert bl["agreement"]["agreement"] == 0.5 and bl["agreement"]["student_ties"] == bl["agreement"]["pairs"]
    assert rep["heads"]["hps"]["student"]["cosine"]["mean"] == pytest.approx(1, abs=1e-5)
    assert rep["heads"]["aes"]["cosine_of"] == "hps" and "cosine" not in rep["heads"]["aes"]["student"]
    assert rep["heads"]["aes"]["baseline"]["spearman"] is None      # one embedding, no text: one value

    noisy = ag.evaluate_ensemble(lookup(rows, noise=0.03), rows, ensemble, WEIGHTS, holdout=0, file=None)
    for name, r in [*noisy["heads"].items(), ("total", noisy["total"])]:
        st, bl = r["student"], r["baseline"]
        assert 0.6 < st["agreement"]["agreement"] < 1.0 and st["agreement"]["agreement"] > bl["agreement"]["agreement"]
        assert st["spearman"] > max(bl["spearman"] or 0.0, 0.5), name
        if "cosine" in st:
            assert st["cosine"]["mean"] > bl["cosine"]["mean"] + 0.5 and st["cosine"]["q05"] <= st["cosine"]["q50"]


def test_evaluate_ensemble_teacher_rewards_are_the_teachers(ensemble):
    # the teacher side, by hand from the teachers' towers: HPS 1 - cos(image, text) for one group
    rows = make_rows(n_per_prompt=3, prompts=PROMPTS[:2])
    rep = ag.evaluate_ensemble(lookup(rows, noise=0.5), rows, ensemble, {"hps": 1.0}, holdout=0, file=None)
    txt = F.normalize(ensemble["hps"].model.encode_text(inputs.tokenize(PROMPTS[:2], 77)).float(), dim=-1).detach()
    t = 1 - (F.normalize(rows.columns["hps"].float(), dim=-1) * txt[torch.arange(6) // 3]).sum(-1)
    s = 1 - (F.normalize(lookup(rows, noise=0.5)(rows.latents)["hps"], dim=-1) * txt[torch.arange(6) // 3]).sum(-1)
    want = brute_force(s.tolist(), t.tolist(), (torch.arange(6) // 3).tolist())
    assert rep["heads"]["hps"]["student"]["agreement"]["agreement"] == pytest.approx(want)
    assert rep["total"]["student"]["agreement"]["agreement"] == pytest.approx(want)
    # score instead of reward: the orderings are the same (score = scale * value, reward = constant - value)
    score = ag.evaluate_ensemble(lookup(rows, noise=0.5), rows, ensemble, {"hps": 1.0}, holdout=0, use="score",
                                 file=None)
    assert score["heads"]["hps"]["student"]["agreement"] == rep["heads"]["hps"]["student"]["agreement"]


def test_evaluate_ensemble_holdout_and_refusals(ensemble):
    rows = make_rows()
    rep = ag.evaluate_ensemble(lookup(rows), rows, ensemble, WEIGHTS, holdout=0.5, file=None)
    assert rep["baseline_mean_from"] == "training split" and 0 < rep["rows"] < 60
    with pytest.raises(ValueError, match="predict returned no embedding for head 'clip'"):
        ag.evaluate_ensemble(lambda x: {"hps": torch.zeros(len(x), 32)}, rows, ensemble, WEIGHTS, holdout=0, file=None)
    with pytest.raises(ValueError, match="predict's 'hps' embeddings has non-finite values"):
        ag.evaluate_ensemble(lambda x: {"hps": torch.full((len(x), 32), float("nan")), "clip": torch.ones(len(x), 32)},
                             rows, ensemble, WEIGHTS, holdout=0, file=None)
    bare = Targets(rows.keys, rows.latents, rows.embeddings, {}, rows.columns, {}, None)
    with pytest.raises(ValueError, match="60 of 60 evaluated rows have no prompt"):
        ag.evaluate_ensemble(lookup(rows), bare, ensemble, WEIGHTS, holdout=0, file=None)
    with pytest.raises(ValueError, match="not in the ensemble"):
        ag.evaluate_ensemble(lookup(rows), rows, ensemble, {"pick": 1.0}, holdout=0, file=None)
    with pytest.raises(ValueError, match="no embedding column for \\['clip'\\]"):
        ag.evaluate_ensemble(lookup(rows), Targets(rows.keys, rows.latents, rows.embeddings, {},
                                                   {"hps": rows.columns["hps"]}, {}, rows.prompts),
                             ensemble, WEIGHTS, holdout=0, file=None)
