"""Judging calibration over resampled splits: the bookkeeping (no redraw ever calibrates on a
sample it tests) and the summary."""

import numpy as np
import pytest

from dimee_models import resample
from dimee_models.cost import CostModel
from dimee_models.outputs import ExitOutputs
from dimee_models.resample import partitions, resampled, summarize


def outputs(n: int, first_id: int, seed: int) -> ExitOutputs:
    """Random 6-exit outputs whose z[:, 0] is each sample's id, so a subset shows which rows it holds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 6, 3)).astype(np.float32)
    logits[np.arange(n), :, labels] += np.linspace(0.2, 3.0, 6)  # deeper exits are right more often
    z = rng.normal(size=(n, 4)).astype(np.float32)
    z[:, 0] = np.arange(first_id, first_id + n)
    return ExitOutputs(logits, z, labels, 2, 4)


def test_partitions_are_disjoint_cover_everything_and_keep_the_sizes():
    draws = partitions(30, 20, 5, seed=1)
    assert len(draws) == 5
    for cal, test in draws:
        assert len(cal) == 30 and len(test) == 20 and not set(cal) & set(test)
        assert sorted(np.concatenate([cal, test])) == list(range(50))
    assert all((a[0] == b[0]).all() for a, b in zip(draws, partitions(30, 20, 5, seed=1)))  # seeded
    assert any(set(a[0]) != set(b[0]) for a, b in zip(draws, draws[1:]))  # and redrawn each time


def test_no_redraw_calibrates_on_a_sample_it_tests(monkeypatch):
    calibration, test = outputs(60, 0, 0), outputs(40, 60, 1)
    seen = []
    real_calibrate, real_assign = resample.calibrate_all, resample.method_assignments

    def calibrate_all(out, *args, **kwargs):
        seen.append(("calibrated", set(out.z[:, 0].astype(int))))
        return real_calibrate(out, *args, **kwargs)

    def method_assignments(out, *args, **kwargs):
        seen.append(("tested", set(out.z[:, 0].astype(int))))
        return real_assign(out, *args, **kwargs)

    monkeypatch.setattr(resample, "calibrate_all", calibrate_all)
    monkeypatch.setattr(resample, "method_assignments", method_assignments)
    report = resampled(calibration, test, CostModel(), 5.0, [0.1, None], k=3, seed=0, folds=3)
    assert [what for what, _ in seen] == ["calibrated", "tested"] * 6  # 3 redraws x 2 deltas
    for (_, cal_ids), (_, test_ids) in zip(seen[::2], seen[1::2]):
        assert len(cal_ids) == 60 and len(test_ids) == 40 and not cal_ids & test_ids
        assert cal_ids | test_ids == set(range(100))
    for delta in (0.1, None):
        methods = report[delta]["methods"]
        assert methods["cloud_only"]["cost_reduction_mean"] == 0 and methods["cloud_only"]["within_budget_share"] == 1
        assert methods["oracle"]["oracle_share_mean"] == pytest.approx(1.0)
        assert all(m["k"] == 3 for m in methods.values())
        assert sum(report[delta]["default_choices"].values()) == 3


def test_unlabeled_texts_with_known_labels_are_redrawn_with_the_splits_and_certify_without_them(monkeypatch):
    """Fixed unlabelled texts would judge the guarantee on one draw of them: with their labels known,
    every redraw takes its calibration, unlabelled and test rows from the whole pool, and the
    unlabelled ones reach calibration without labels."""
    calibration, test, extra = outputs(60, 0, 0), outputs(40, 60, 1), outputs(50, 100, 2)
    seen = []
    real_calibrate, real_assign = resample.calibrate_all, resample.method_assignments

    def calibrate_all(out, *args, unlabeled=None, **kwargs):
        assert (unlabeled.labels == -1).all() and (out.labels >= 0).all()
        seen.append((set(out.z[:, 0].astype(int)), set(unlabeled.z[:, 0].astype(int))))
        return real_calibrate(out, *args, unlabeled=unlabeled, **kwargs)

    def method_assignments(out, *args, **kwargs):
        seen.append(set(out.z[:, 0].astype(int)))
        return real_assign(out, *args, **kwargs)

    monkeypatch.setattr(resample, "calibrate_all", calibrate_all)
    monkeypatch.setattr(resample, "method_assignments", method_assignments)
    resampled(calibration, test, CostModel(), 5.0, [0.1], k=4, seed=0, folds=3, unlabeled=extra)
    draws = list(zip(seen[::2], seen[1::2]))
    for (cal_ids, unlabeled_ids), test_ids in draws:
        assert (len(cal_ids), len(unlabeled_ids), len(test_ids)) == (60, 50, 40)
        assert cal_ids | unlabeled_ids | test_ids == set(range(150)) and not (cal_ids & test_ids or unlabeled_ids & test_ids)
    assert any(test_ids & set(range(100, 150)) for _, test_ids in draws)  # held-out texts are test rows too
    assert len({frozenset(u) for (_, u), _ in draws}) == 4
    seen.clear()
    resampled(calibration, test, CostModel(), 5.0, [0.1], k=2, seed=0, folds=3,
              unlabeled=ExitOutputs(extra.logits, extra.z, np.full(50, -1), 2, 4))
    assert all(u == set(range(100, 150)) and t <= set(range(100)) for (_, u), t in zip(seen[::2], seen[1::2]))


def test_summary_by_hand():
    drops, cuts = np.array([0.1, 0.3, 0.5, -0.2]), np.array([0.4, 0.5, 0.6, 0.3])
    s = summarize(drops, cuts, np.array([0.8, 1.0, 1.2, 0.6]), budget_pp=0.3)
    assert s["k"] == 4 and s["within_budget_share"] == 0.75  # 0.3 exactly is within
    assert s["cost_reduction_mean"] == pytest.approx(0.45) and s["accuracy_drop_pp_mean"] == pytest.approx(0.175)
    assert s["oracle_share_mean"] == pytest.approx(0.5)
    assert s["accuracy_drop_pp_p90"] == pytest.approx(np.percentile(drops, 90))
