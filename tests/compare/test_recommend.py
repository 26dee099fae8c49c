"""Recommendations on hand-made results tables: exact picks, the 1-point rule, the paired verdicts."""

import numpy as np
import pandas as pd
import pytest

from bakeoff.compare.recommend import available_latencies, fmt_p, fmt_seconds, recommend

N = 1000  # validation images of the hand-made tables


def _row(model, acc, lo, hi, train, lat, framework="pytorch", status="ok", right=None, **extra):
    """A results row; ``right`` = (first, last) gives per-image answers: images first..last-1 right."""
    row = {"model": model, "framework": framework, "status": status, "accuracy": acc, "accuracy_ci_low": lo,
           "accuracy_ci_high": hi, "train_time_s": train, "latency_ms_p50": lat, "latency_ms_p95": lat,
           "error": None if status == "ok" else "RuntimeError: boom", **extra}
    if right is not None:
        true = np.arange(N) % 3
        correct = (np.arange(N) >= right[0]) & (np.arange(N) < right[1])
        row |= {"val_true": true, "val_pred": np.where(correct, true, (true + 1) % 3)}
        assert acc == pytest.approx(correct.mean())
    return row


def _table(*rows):
    return pd.DataFrame(list(rows))


def _by_kind(recs):
    out = {}
    for r in recs:
        out.setdefault(r.kind, []).append(r)
    return out


@pytest.fixture
def results():
    # big: most accurate, slow. mid: 0.8 points below, fastest to train. small: 0.9 points below,
    # fastest inference. tiny: 5 points below, fastest of all but outside the 1-point margin.
    # keras_a / keras_b: the tensorflow models. broken: failed, with "figures" that must be ignored.
    # Per-image answers: big and mid disagree on 32 images (20 for big, 12 for mid), small is big
    # less its last 9 right images, keras_a is right wherever keras_b is and on 130 more.
    return _table(
        _row("big", 0.950, 0.940, 0.960, 100.0, 10.0, right=(0, 950)),
        _row("mid", 0.942, 0.930, 0.952, 40.0, 8.0, right=(20, 962)),
        _row("small", 0.941, 0.929, 0.951, 60.0, 3.0, right=(0, 941)),
        _row("tiny", 0.900, 0.880, 0.915, 5.0, 1.0, right=(0, 900)),
        _row("keras_a", 0.930, 0.915, 0.943, 50.0, 4.0, framework="tensorflow", right=(0, 930)),
        _row("keras_b", 0.800, 0.780, 0.820, 30.0, 2.0, framework="tensorflow", right=(0, 800)),
        _row("broken", 0.999, 0.998, 1.0, 0.1, 0.1, status="failed"),
    )


def test_exact_picks(results):
    recs = _by_kind(recommend(results))
    assert [r.pick.model for r in recs["most-accurate"]] == ["big"]
    assert recs["most-accurate"][0].runner_up.model == "mid"
    assert [r.pick.model for r in recs["fastest-training"]] == ["mid"]
    assert [r.pick.model for r in recs["fastest-inference"]] == ["small"]
    assert recs["fastest-inference"][0].latency == "in-process"
    assert recs["fastest-inference"][0].pick.latency_ms == 3.0


def test_within_one_point_rule(results):
    # tiny trains in 5 s but is 5 points down: excluded; widening the margin to 6 points picks it.
    fast = _by_kind(recommend(results))["fastest-training"][0]
    assert fast.pick.model == "mid" and fast.runner_up.model == "small"
    assert "of the 3 models within 1 point" in fast.text
    assert "40.0 s" in fast.text and "1.50x as long" in fast.text
    wide = _by_kind(recommend(results, within=0.06))
    assert wide["fastest-training"][0].pick.model == "tiny"
    assert wide["fastest-inference"][0].pick.model == "tiny"
    # exactly one point below the best still counts (0.95 - 0.94 is not above 0.01 in floating point)
    edge = _table(_row("a", 0.95, 0.9, 1.0, 10.0, 5.0), _row("b", 0.94, 0.9, 1.0, 1.0, 1.0))
    assert _by_kind(recommend(edge))["fastest-training"][0].pick.model == "b"
    # 1.01 points below does not
    edge = _table(_row("a", 0.95, 0.9, 1.0, 10.0, 5.0), _row("b", 0.9399, 0.9, 1.0, 1.0, 1.0))
    fast = _by_kind(recommend(edge))["fastest-training"][0]
    assert fast.pick.model == "a" and fast.runner_up is None and fast.text.startswith("only a is within 1 point")


def _mcnemar(only_a, only_b):
    from statsmodels.stats.contingency_tables import mcnemar

    return mcnemar([[0, only_a], [only_b, 0]], exact=True).pvalue


def test_paired_verdicts(results):
    recs = _by_kind(recommend(results))
    # big vs mid: 20 images against 12, not distinguishable at 5%: warned, with the test's figures
    best = recs["most-accurate"][0]
    assert best.warning == (f"not distinguishable from the runner-up mid: 95.0% vs 94.2%, {fmt_p(_mcnemar(20, 12))}, "
                            "exact McNemar test on the same 1000 validation images: 20 right only for big, 12 only "
                            "for mid; more validation images would be needed to tell them apart")
    # keras_a vs keras_b: 130 images against none: better than it, no warning
    tf = [r for r in recs["best-of-framework"] if r.framework == "tensorflow"][0]
    assert tf.warning is None
    assert tf.text.endswith("runner-up keras_b at 80.0%; better than it (p < 0.001, exact McNemar test on the same "
                            "1000 validation images: 130 right only for keras_a, 0 only for keras_b).")
    # the speed picks state how their accuracy compares with the next fastest's
    fast = recs["fastest-training"][0]
    assert fast.warning is None and f"its accuracy is not distinguishable from small's ({fmt_p(_mcnemar(21, 20))}" \
        in fast.text
    # the fastest is less accurate than the next fastest by the test: warned
    t = _table(_row("a", 0.95, 0.9, 1.0, 10.0, 5.0, right=(0, 950)), _row("b", 0.94, 0.9, 1.0, 1.0, 1.0, right=(0, 940)))
    fast = _by_kind(recommend(t))["fastest-training"][0]
    assert fast.pick.model == "b" and fast.warning.startswith(
        f"the next fastest, a, is more accurate: 95.0% vs 94.0%, {fmt_p(2 / 2 ** 10)}, exact McNemar test")
    # identical answers: not distinguishable (p = 1)
    same = _table(_row("a", 0.95, 0.9, 1.0, 10.0, 5.0, right=(0, 950)), _row("b", 0.95, 0.9, 1.0, 11.0, 1.0,
                                                                           right=(0, 950)))
    assert "p = 1, exact McNemar" in recommend(same)[0].warning


def test_without_per_image_answers_nothing_is_claimed():
    t = _table(_row("a", 0.95, 0.94, 0.96, 10.0, 1.0), _row("b", 0.90, 0.88, 0.92, 10.0, 1.0))
    rec = recommend(t)[0]
    assert rec.pick.model == "a" and rec.warning.startswith("not tested against the runner-up b: per-image "
                                                            "predictions are missing")
    # one image short: not the same images, so not paired either
    short = _row("b", 0.90, 0.88, 0.92, 10.0, 1.0, right=(0, 900))
    short |= {"val_true": short["val_true"][:-1], "val_pred": short["val_pred"][:-1]}
    paired = _table(_row("a", 0.95, 0.94, 0.96, 10.0, 1.0, right=(0, 950)), short)
    assert recommend(paired)[0].warning.startswith("not tested against the runner-up b")
    assert recommend(_table(_row("a", 0.95, 0.94, 0.96, 10.0, 1.0)))[0].warning is None  # no runner-up


def test_best_per_framework(results):
    recs = _by_kind(recommend(results))["best-of-framework"]
    assert [(r.framework, r.pick.model, r.runner_up.model) for r in recs] == [
        ("pytorch", "big", "mid"), ("tensorflow", "keras_a", "keras_b")]
    assert recs[1].title == "Best tensorflow model"
    assert "93.0% (95% CI 91.5–94.3%)" in recs[1].text


def test_failed_rows_ignored(results):
    recs = recommend(results)
    assert all("broken" not in (r.pick.model, getattr(r.runner_up, "model", None)) for r in recs)
    assert all("broken" not in r.text for r in recs)
    # a row marked ok but without accuracy is not a candidate either
    odd = _table(_row("a", None, None, None, 1.0, 1.0), _row("b", 0.5, 0.4, 0.6, 2.0, 2.0))
    assert recommend(odd)[0].pick.model == "b"
    failed_only = _table(_row("x", 0.9, 0.8, 1.0, 1.0, 1.0, status="failed"))
    assert recommend(failed_only) == []


def test_models_at_chance_are_never_picked(results):
    # "lazy" always answers the big class of an imbalanced split: top accuracy and fastest, yet no skill
    lazy = _row("lazy", 0.960, 0.955, 0.965, 1.0, 0.5, chance_accuracy=0.96, above_chance=False)
    checked = results.assign(chance_accuracy=0.5, above_chance=True)
    recs = recommend(pd.concat([_table(lazy), checked], ignore_index=True))
    assert all("lazy" not in (r.pick.model, getattr(r.runner_up, "model", None)) for r in recs)
    assert [r.pick.model for r in recs if r.kind != "best-of-framework"] == ["big", "mid", "small"]
    unchecked = recommend(pd.concat([_table(lazy | {"above_chance": True}), checked], ignore_index=True))
    assert unchecked[0].pick.model == "lazy"
    assert recommend(_table(lazy)) == []


def test_ties_and_each_latency():
    # equal accuracy: the faster-training model is "most accurate"; one inference pick per latency kind
    t = _table(_row("slow", 0.9, 0.85, 0.95, 20.0, 5.0, endpoint_latency_ms_p50=7.0),
               _row("quick", 0.9, 0.85, 0.95, 10.0, 6.0, endpoint_latency_ms_p50=2.0),
               _row("gone", None, None, None, None, None, status="failed", endpoint_latency_ms_p50=None))
    assert available_latencies(t) == ["in-process", "endpoint"]
    recs = _by_kind(recommend(t))
    assert recs["most-accurate"][0].pick.model == "quick"
    assert [(r.latency, r.pick.model) for r in recs["fastest-inference"]] == [("in-process", "slow"),
                                                                             ("endpoint", "quick")]
    assert "HTTP endpoint" in recs["fastest-inference"][1].title


def test_helpers():
    assert fmt_seconds(0.1234) == "0.12 s" and fmt_seconds(75) == "75.0 s" and fmt_seconds(600) == "10 min 00 s"
    assert fmt_seconds(None) == "–"
    assert fmt_p(0.2153) == "p = 0.22" and fmt_p(0.00049) == "p < 0.001" and fmt_p(1.0) == "p = 1"
    assert fmt_p(float("nan")) == "–"
