"""Can RL use a reward student? Its agreement with each teacher on held-out targets (issue 32, part 6).

A cosine close to 1 says the student's embedding points where the teacher's does; RL needs more: the rewards
read from it must order samples as the teacher's do. GRPO (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300,
section 4.1.2, outcome supervision) scores a group of G samples drawn for one prompt and gives each the
group-relative advantage ``A_i = (r_i - mean(r)) / std(r)``: anything that depends on the prompt alone (an offset
shared by the group) cancels, and what drives the update is how the rewards order and space the samples *within*
the group. flow_grpo and DiffusionNFT use the same per-prompt normalisation. So, per head:

- ``cosine``: cosine between student and teacher embeddings, the mean and per-sample quantiles;
- ``spearman``: Spearman's rank correlation of the student's rewards with the teacher's, over all rows;
- ``agreement``: within-group pairwise agreement (defined in :func:`pairwise_agreement`), the fraction of pairs of
  samples sharing a prompt that the student orders as the teacher does;

each beside the **mean-embedding baseline** (a constant predictor: the normalised mean of the teacher's
training embeddings, scored with each sample's own text embedding, so its rewards vary by prompt only) and
**chance** (0 cosine and 0 Spearman for a predictor unrelated to the teacher, 0.5 pairwise agreement). Within a
group sharing one prompt the baseline gives every sample the same reward: it orders no pair, every pair is a
student tie scored 1/2, so its agreement is exactly 0.5, chance, and its GRPO advantages are all zero. It can
still have a positive Spearman across prompts: a prompt-level effect GRPO cancels, and the reason Spearman alone
says too little. :func:`total_report` gives the same for the weighted sum of the heads' rewards.

Everything here is a pure function of tensors, except :func:`evaluate_ensemble`, which runs a predictor (any
callable ``latents -> {head: embedding}``) over a targets folder's rows, computes every reward with the
teachers' own ``reward`` / ``score`` and text towers, prints a table and writes JSON.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
CHANCE = {"cosine": 0.0, "spearman": 0.0, "agreement": 0.5}
_PAIR_BLOCK = 1 << 22  # pair-difference entries per block (float64: 32 MiB)


# -- checks ------------------------------------------------------------------------------------------
def _as_float(x, name: str, ndim: int) -> torch.Tensor:
    """``x`` as a float64 CPU tensor of ``ndim`` dimensions, refused when not finite."""
    t = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim > 1 else ''}, got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bad.any():
        rows = bad.reshape(len(t), -1).any(1).nonzero().flatten()
        raise ValueError(f"{name} has non-finite values (NaN or Inf) in {len(rows)} of {len(t)} rows (first: row "
                         f"{int(rows[0])}): a NaN reward or embedding orders nothing; find where it came from "
                         "(a diverged student, a bad target row) before evaluating")
    return t


def group_ids(groups) -> torch.Tensor:
    """Integer group ids (0..G-1) of ``groups``: a 1-D integer tensor, or a sequence of hashable labels (e.g. the
    prompts: samples sharing a prompt form a group). None labels are refused."""
    if isinstance(groups, torch.Tensor):
        if groups.ndim != 1 or groups.is_floating_point() or groups.is_complex():
            raise ValueError(f"groups: a 1-D integer tensor or a sequence of labels, got a {groups.dtype} tensor of "
                             f"shape {tuple(groups.shape)}")
        return torch.unique(groups.cpu(), return_inverse=True)[1]
    labels = list(groups)
    if any(g is None for g in labels):
        raise ValueError(f"groups: {sum(g is None for g in labels)} of {len(labels)} rows have no group (None); "
                         "every row needs one (its prompt)")
    index: dict[Hashable, int] = {}
    return torch.tensor([index.setdefault(g, len(index)) for g in labels], dtype=torch.long)


def _same_length(n: int, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and len(t) != n:
            raise ValueError(f"{name} has {len(t)} rows, expected {n} (one per sample)")


# -- metrics -----------------------------------------------------------------------------------------
def rankdata(x) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values given the average of the ranks they span (as
    ``scipy.stats.rankdata(method="average")``), float64."""
    x = _as_float(x, "x", 1)
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def spearman(a, b) -> float | None:
    """Spearman's rank correlation: the Pearson correlation of the two vectors' average ranks (ties averaged).
    None where it is undefined: fewer than 2 samples, or one side constant."""
    a, b = _as_float(a, "a", 1), _as_float(b, "b", 1)
    _same_length(len(a), b=b)
    if len(a) < 2:
        return None
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if den == 0:
        return None
    return max(-1.0, min(1.0, float((ra * rb).sum()) / den))


def _pairs_of_groups(t: torch.Tensor, s: torch.Tensor, tie_tol: float) -> torch.Tensor:
    """Per group of a (k, n) block of equal-size groups: (counted pairs, agreement score, teacher ties, student
    ties among the counted pairs), (k, 4) float64."""
    k, n = t.shape
    out = torch.zeros(k, 4, dtype=torch.float64)
    rows = max(1, _PAIR_BLOCK // max(1, k * n))
    j = torch.arange(n)
    for r0 in range(0, n, rows):
        i = torch.arange(r0, min(n, r0 + rows))
        upper = (j[None, :] > i[:, None])[None]
        dt = t[:, i, None] - t[:, None, :]
        ds = s[:, i, None] - s[:, None, :]
        t_tie = dt.abs() <= tie_tol
        counted = upper & ~t_tie
        s_tie = counted & (ds.abs() <= tie_tol)
        agree = counted & ~s_tie & ((dt > 0) == (ds > 0))
        out[:, 0] += counted.sum((1, 2))
        out[:, 1] += agree.sum((1, 2)) + 0.5 * s_tie.sum((1, 2))
        out[:, 2] += (upper & t_tie).sum((1, 2))
        out[:, 3] += s_tie.sum((1, 2))
    return out


def pairwise_agreement(student_reward, teacher_reward, groups, *, tie_tol: float = 0.0) -> dict:
    """Within-group pairwise agreement of the student's rewards with the teacher's.

    For every group g (the rows sharing a label in ``groups``, e.g. a prompt) and every unordered pair {i, j} of
    its rows: the pair is a **teacher tie** when ``|t_i - t_j| <= tie_tol``; teacher ties are excluded (an order
    the teacher does not give can be neither kept nor broken) and counted in ``teacher_ties``. Every other pair
    is **counted** and scores 1 when the student orders it as the teacher does (``(s_i - s_j)`` of the sign of
    ``(t_i - t_j)``), 1/2 when the student ties it (``|s_i - s_j| <= tie_tol``: it orders nothing, as a coin
    would on average; counted in ``student_ties``), 0 when the student reverses it. ``agreement`` is the scores'
    sum over the counted pairs of all groups divided by their number (pooled: every pair weighs the same);
    ``group_mean`` the mean over groups with a counted pair of each group's own fraction (every prompt weighs
    the same, as in a GRPO batch). Over the counted pairs ``agreement = (1 + tau) / 2`` with ``tau`` Kendall's
    tau-a of the student against the teacher. A perfect student scores 1, a reversed one 0, one unrelated to
    the teacher 1/2 in expectation, a constant one exactly 1/2. Groups of one row have no pair
    (``singletons``); ``agreement`` and ``group_mean`` are None when no pair is counted.

    The direction does not matter as long as both sides use the same one (ReNO's losses, lower is better, or
    the teachers' scores, higher is better): agreement is unchanged when both are negated.
    """
    s = _as_float(student_reward, "student_reward", 1)
    t = _as_float(teacher_reward, "teacher_reward", 1)
    ids = group_ids(groups)
    _same_length(len(t), student_reward=s, groups=ids)
    if not tie_tol >= 0:
        raise ValueError(f"tie_tol must be >= 0, got {tie_tol}")
    order = torch.argsort(ids, stable=True)
    ids, s, t = ids[order], s[order], t[order]
    sizes = torch.bincount(ids) if len(ids) else torch.zeros(0, dtype=torch.long)
    starts = torch.cumsum(sizes, 0) - sizes
    per_group = torch.zeros(len(sizes), 4, dtype=torch.float64)
    for n in sorted(set(sizes.tolist())):
        if n < 2:
            continue
        which = (sizes == n).nonzero().flatten()
        idx = starts[which, None] + torch.arange(n)[None]
        per_group[which] = _pairs_of_groups(t[idx], s[idx], tie_tol)
    counted, score = float(per_group[:, 0].sum()), float(per_group[:, 1].sum())
    has = per_group[:, 0] > 0
    return {"agreement": score / counted if counted else None,
            "group_mean": float((per_group[has, 1] / per_group[has, 0]).mean()) if has.any() else None,
            "pairs": int(counted), "teacher_ties": int(per_group[:, 2].sum()),
            "student_ties": int(per_group[:, 3].sum()), "groups": len(sizes),
            "groups_with_pairs": int(has.sum()), "singletons": int((sizes == 1).sum())}


def cosine_stats(pred_emb, target_emb, quantiles: Sequence[float] = QUANTILES) -> dict:
    """Per-sample cosine between ``pred_emb`` ((N, D), or (D,): one embedding for every row, a constant
    predictor) and ``target_emb`` (N, D), both normalised here: ``mean``, ``min`` and the ``quantiles``
    (``q05`` for 0.05, ...; linear interpolation, as ``torch.quantile``)."""
    target = _as_float(target_emb, "target_emb", 2)
    pred = torch.as_tensor(pred_emb)
    pred = _as_float(pred, "pred_emb", pred.ndim if pred.ndim in (1, 2) else 2)
    if pred.ndim == 1:
        pred = pred.expand(len(target), -1)
    if pred.shape != target.shape:
        raise ValueError(f"embeddings of shape {tuple(pred.shape)} and {tuple(target.shape)}: one per sample, of "
                         "the teacher's width")
    if len(target) == 0:
        raise ValueError("no samples to compare")
    cos = (F.normalize(pred, dim=-1) * F.normalize(target, dim=-1)).sum(-1)
    q = torch.quantile(cos, torch.tensor(list(quantiles), dtype=torch.float64))
    return {"mean": float(cos.mean()), "min": float(cos.min()),
            **{f"q{round(p * 100):02d}": float(v) for p, v in zip(quantiles, q)}}


def _ranking(student_reward, teacher_reward, groups, tie_tol) -> dict:
    return {"spearman": spearman(student_reward, teacher_reward),
            "agreement": pairwise_agreement(student_reward, teacher_reward, groups, tie_tol=tie_tol)}


def head_report(student_emb, teacher_emb, student_reward, teacher_reward, groups, train_mean_emb, *,
                baseline_reward=None, quantiles: Sequence[float] = QUANTILES, tie_tol: float = 0.0) -> dict:
    """One head's figures on held-out rows: ``{"rows", "student", "baseline", "chance"}``.

    ``student_emb`` / ``teacher_emb``: (N, D) embeddings (None for a head without one of its own, e.g. an
    aesthetic MLP on its base's embedding: no cosine); ``student_reward`` / ``teacher_reward``: (N,) rewards;
    ``groups``: (N,) labels, the rows sharing one (a prompt) forming a group; ``train_mean_emb``: (D,) the mean
    of the teacher's training embeddings (normalised here), the baseline's one embedding; ``baseline_reward``:
    (N,) the rewards of that embedding with each row's text embedding (constant within a group sharing a
    prompt; None: the baseline is taken as constant within each group, and its Spearman is not reported).

    ``student`` and ``baseline`` each hold ``cosine`` (:func:`cosine_stats`), ``spearman`` (:func:`spearman` of
    its rewards against the teacher's) and ``agreement`` (:func:`pairwise_agreement`); ``chance`` the figures of
    a predictor unrelated to the teacher (cosine 0, Spearman 0, agreement 0.5). Every input is refused when not
    finite."""
    t_reward = _as_float(teacher_reward, "teacher_reward", 1)
    s_reward = _as_float(student_reward, "student_reward", 1)
    n = len(t_reward)
    ids = group_ids(groups)
    _same_length(n, student_reward=s_reward, groups=ids)
    out = {"rows": n, "student": {}, "baseline": {}, "chance": dict(CHANCE)}
    if (student_emb is None) != (teacher_emb is None):
        raise ValueError("student_emb and teacher_emb: both or neither (a head without an embedding of its own)")
    if teacher_emb is not None:
        t_emb = _as_float(teacher_emb, "teacher_emb", 2)
        s_emb = _as_float(student_emb, "student_emb", 2)
        _same_length(n, teacher_emb=t_emb, student_emb=s_emb)
        out["student"]["cosine"] = cosine_stats(s_emb, t_emb, quantiles)
        if train_mean_emb is None:
            raise ValueError("train_mean_emb is required with embeddings (the mean-embedding baseline)")
        out["baseline"]["cosine"] = cosine_stats(_as_float(train_mean_emb, "train_mean_emb", 1), t_emb, quantiles)
    out["student"].update(_ranking(s_reward, t_reward, ids, tie_tol))
    if baseline_reward is None:
        out["baseline"].update({"spearman": None,
                                "agreement": pairwise_agreement(torch.zeros(n), t_reward, ids, tie_tol=tie_tol)})
    else:
        b = _as_float(baseline_reward, "baseline_reward", 1)
        _same_length(n, baseline_reward=b)
        out["baseline"].update(_ranking(b, t_reward, ids, tie_tol))
    return out


def weighted_total(rewards: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum_h weights[h] * rewards[h]`` (float64) over the heads ``weights`` names."""
    _check_weights(weights, rewards)
    return sum(float(w) * _as_float(rewards[h], f"rewards[{h!r}]", 1) for h, w in weights.items())


def _check_weights(weights: Mapping[str, float], heads) -> None:
    if not weights:
        raise ValueError("weights: name at least one head, e.g. {'hps': 5.0, 'pick': 0.05}")
    unknown = [h for h in weights if h not in heads]
    if unknown:
        raise ValueError(f"weights name heads that are not in the ensemble: {unknown} (heads: {', '.join(heads)})")
    values = [float(w) for w in weights.values()]
    if not all(math.isfinite(w) for w in values) or not any(values):
        raise ValueError(f"weights must be finite and not all zero, got {dict(weights)}")


def total_report(student_rewards: Mapping[str, torch.Tensor], teacher_rewards: Mapping[str, torch.Tensor],
                 weights: Mapping[str, float], groups, *, baseline_rewards: Mapping[str, torch.Tensor] | None = None,
                 tie_tol: float = 0.0) -> dict:
    """The weighted sum of the heads' rewards (``weights``: head -> weight, the heads it names only), student
    against teacher: ``{"rows", "weights", "student", "baseline", "chance"}`` with ``spearman`` and
    ``agreement`` as in :func:`head_report` (no cosine: a sum of rewards has no embedding)."""
    for r in (student_rewards, teacher_rewards, *((baseline_rewards,) if baseline_rewards is not None else ())):
        _check_weights(weights, list(r))
    t = weighted_total(teacher_rewards, weights)
    s = weighted_total(student_rewards, weights)
    ids = group_ids(groups)
    _same_length(len(t), student_rewards=s, groups=ids)
    out = {"rows": len(t), "weights": {h: float(w) for h, w in weights.items()},
           "student": _ranking(s, t, ids, tie_tol), "chance": {k: CHANCE[k] for k in ("spearman", "agreement")}}
    if baseline_rewards is None:
        out["baseline"] = {"spearman": None,
                           "agreement": pairwise_agreement(torch.zeros(len(t)), t, ids, tie_tol=tie_tol)}
    else:
        out["baseline"] = _ranking(weighted_total(baseline_rewards, weights), t, ids, tie_tol)
    return out


# -- on a targets folder -----------------------------------------------------------------------------
def _fmt(v, width: int = 7) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}"


def format_table(report: dict) -> str:
    """The report of :func:`evaluate_ensemble` as a text table: a row per head and one for the weighted total;
    for cosine, Spearman and pairwise agreement the student, the mean-embedding baseline and chance."""
    head = (f"{'head':<12} {'cos':>7} {'cos b':>7} {'cos 0':>7} | {'rho':>7} {'rho b':>7} {'rho 0':>7} | "
            f"{'agree':>7} {'agree b':>7} {'agree 0':>7} | {'pairs':>7} {'t-ties':>7}")
    lines = [head, "-" * len(head)]
    rows = [*report["heads"].items(), ("total", report["total"])]
    for name, r in rows:
        st, bl, ch = r["student"], r["baseline"], r["chance"]
        cos = [st.get("cosine", {}).get("mean"), bl.get("cosine", {}).get("mean"),
               ch["cosine"] if "cosine" in st else None]
        lines.append(f"{name:<12} {_fmt(cos[0])} {_fmt(cos[1])} {_fmt(cos[2])} | {_fmt(st['spearman'])} "
                     f"{_fmt(bl['spearman'])} {_fmt(ch['spearman'])} | {_fmt(st['agreement']['agreement'])} "
                     f"{_fmt(bl['agreement']['agreement'])} {_fmt(ch['agreement'])} | "
                     f"{st['agreement']['pairs']:>7d} {st['agreement']['teacher_ties']:>7d}")
    lines.append("b: mean-embedding baseline; 0: chance; rho: Spearman of rewards; agree: within-prompt pairwise "
                 "agreement; pairs: counted pairs (teacher ties excluded)")
    return "\n".join(lines)


def _write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)


def evaluate_ensemble(predict: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], targets, teachers,
                      weights: Mapping[str, float], *, holdout: float = 0.05, train_targets=None,
                      use: str = "reward", out=None, batch_size: int = 256, device="cpu", tie_tol: float = 0.0,
                      quantiles: Sequence[float] = QUANTILES, file=sys.stdout) -> dict:
    """A reward student against its teacher set on held-out targets: :func:`head_report` per teacher,
    :func:`total_report` for the ``weights``-weighted sum; prints :func:`format_table` to ``file`` (None: no
    print) and, with ``out``, writes the report as JSON (through a temporary file, replaced).

    ``predict``: any callable from a batch of latents ((B, C, H, W) float32 on ``device``, VAE space, as the
    targets hold them) to ``{name: (B, D) embedding}`` for every CLIP teacher of the set (extra keys are
    ignored), e.g. the multi-head student; called under ``torch.no_grad()``. ``targets``: a ``make_targets``
    folder made with a teacher set, or its ``read_targets`` result. ``teachers``: the set's built teachers,
    ``{name: Teacher}`` (``build_teachers``) or a sequence of them. ``use``: ``"reward"`` (ReNO's losses,
    ``Teacher.reward``, which ReNO's weights apply to) or ``"score"`` (``Teacher.score``, the teachers' own
    scales times their score scaling, which flow_grpo's weights apply to).

    Rows: the held-out split (``holdout``, the key-based one ``train`` uses; 0: every row, e.g. a folder of
    generations kept apart for evaluation). Groups: rows sharing a prompt (``Targets.prompts``), so the folder
    must keep prompts. A head's reward, student and teacher alike, is its teacher's ``reward`` (or ``score``)
    of the embedding with the teacher's text embedding of the row's prompt; an aesthetic head's is its MLP on
    the student's prediction of its base's embedding (it gets no cosine of its own: see its base). The teacher's
    rewards are computed from the stored (float16) target embeddings, through the same code as the student's.

    Baseline: per CLIP teacher, the normalised mean of its embeddings over the training split (else over
    ``train_targets``'s rows, else over the evaluated rows themselves, the best constant there; recorded in
    ``baseline_mean_from``), its rewards from that one embedding with each row's text embedding, computed once
    per prompt, so they are identical within a group.

    Note: with a key-based holdout, a group only has pairs where two rows of one prompt were both held out (at
    0.05 and 4 samples per prompt, about 1.5% of prompts); ``pairs`` says how many were counted. For a
    meaningful agreement evaluate a folder of new prompts, several samples each, at ``holdout=0``.
    """
    from .targets import Targets, read_targets

    if use not in ("reward", "score"):
        raise ValueError(f"use must be 'reward' or 'score', got {use!r}")
    if not isinstance(teachers, Mapping):
        teachers = {t.name: t for t in teachers}
    names = list(teachers)
    _check_weights(weights, names)
    data = targets if isinstance(targets, Targets) else read_targets(targets, teacher=_first_clip(teachers))
    clip = [n for n, t in teachers.items() if t.base is None]
    for n, t in teachers.items():
        if t.base is not None and t.base not in teachers:
            raise ValueError(f"teacher {n!r} is a head on {t.base!r}, which is not in the set given")
    missing = [n for n in clip if n not in data.columns]
    if missing:
        raise ValueError(f"the targets hold no embedding column for {missing} (they have {sorted(data.columns)}): "
                         "evaluate with the teacher set the targets were made with")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    train_rows, rows = data.split(holdout) if holdout else (None, data)
    if len(rows) == 0:
        raise ValueError(f"no held-out rows at holdout={holdout} ({len(data)} rows): pass holdout=0 to evaluate a "
                         "folder kept apart for evaluation")
    if rows.prompts is None or any(p is None for p in rows.prompts):
        none = len(rows) if rows.prompts is None else sum(p is None for p in rows.prompts)
        raise ValueError(f"{none} of {len(rows)} evaluated rows have no prompt: the groups (and the text rewards) "
                         "are the prompts; make the targets from shards with a txt member per sample")
    if train_rows is not None and len(train_rows):
        mean_rows, mean_from = train_rows, "training split"
    elif train_targets is not None:
        mean_rows = train_targets if isinstance(train_targets, Targets) else read_targets(
            train_targets, teacher=_first_clip(teachers))
        mean_from = "train_targets"
    else:
        mean_rows, mean_from = rows, "evaluated rows"
    means = {}
    for n in clip:
        if n not in mean_rows.columns:
            raise ValueError(f"the baseline's rows hold no embedding column for {n!r}")
        means[n] = F.normalize(F.normalize(mean_rows.columns[n].float(), dim=-1).mean(0), dim=0)

    prompts = list(rows.prompts)
    unique = list(dict.fromkeys(prompts))
    index = {p: i for i, p in enumerate(unique)}
    inverse = torch.tensor([index[p] for p in prompts], dtype=torch.long)
    with torch.no_grad():
        text = {n: _embed_texts(t, unique, batch_size) for n, t in teachers.items() if t.has_text}
        pred = {n: [] for n in clip}
        for i in range(0, len(rows), batch_size):
            got = predict(rows.latents[i:i + batch_size].to(device, torch.float32))
            for n in clip:
                if n not in got:
                    raise ValueError(f"predict returned no embedding for head {n!r} (it returned {sorted(got)})")
                e = got[n].detach().float().cpu()
                if e.shape != (min(batch_size, len(rows) - i), teachers[n].embed_dim):
                    raise ValueError(f"predict's {n!r} embedding has shape {tuple(e.shape)}, expected "
                                     f"({min(batch_size, len(rows) - i)}, {teachers[n].embed_dim})")
                pred[n].append(e)
        student = {n: F.normalize(_as_float(torch.cat(pred[n]), f"predict's {n!r} embeddings", 2).float(), dim=-1)
                   for n in clip}
        teacher = {n: F.normalize(rows.columns[n].float(), dim=-1) for n in clip}

        def rewards(t, emb_of, per_prompt=False):
            base = t.base or t.name
            emb = emb_of(base)
            txt = text[t.name] if t.has_text else None
            if per_prompt:  # the baseline: one embedding, one reward per prompt, indexed per row
                emb = emb.expand(len(unique), -1) if t.has_text else emb[None]
                r = getattr(t, use)(emb, txt).float().cpu()
                return r[inverse] if t.has_text else r.expand(len(rows))
            return getattr(t, use)(emb, txt[inverse] if txt is not None else None).float().cpu()

        heads, s_r, t_r, b_r = {}, {}, {}, {}
        for n, t in teachers.items():
            s_r[n] = rewards(t, student.get)
            t_r[n] = rewards(t, teacher.get)
            b_r[n] = rewards(t, means.get, per_prompt=True)
            own = t.base is None
            heads[n] = head_report(student[n] if own else None, teacher[n] if own else None, s_r[n], t_r[n],
                                   inverse, means[n] if own else None, baseline_reward=b_r[n], quantiles=quantiles,
                                   tie_tol=tie_tol)
            if not own:
                heads[n]["cosine_of"] = t.base
        total = total_report(s_r, t_r, weights, inverse, baseline_rewards=b_r, tie_tol=tie_tol)
    report = {"rows": len(rows), "prompts": len(unique), "holdout": holdout, "use": use,
              "baseline_mean_from": mean_from, "tie_tol": tie_tol, "heads": heads, "total": total}
    if file is not None:
        print(format_table(report), file=file)
    if out is not None:
        _write_json(out, report)
    return report


def _first_clip(teachers: Mapping) -> str | None:
    return next((n for n, t in teachers.items() if t.base is None), None)


def _embed_texts(teacher, prompts: list[str], batch_size: int) -> torch.Tensor:
    out = [teacher.embed_texts(prompts[i:i + batch_size]).float().cpu() for i in range(0, len(prompts), batch_size)]
    return _as_float(torch.cat(out), f"teacher {teacher.name!r}'s text embeddings", 2).float()
