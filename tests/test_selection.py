"""Selection metrics (facesiam/selection.py): each reads its value from evaluate()'s metrics dict, higher is better."""

from __future__ import annotations

import pytest

from facesiam.errors import InputError
from facesiam.selection import SELECTION_METRICS, selection_value

METRICS = {"verification": {"auc": 0.9, "eer": 0.12, "tar_at_far": {"1e-03": 0.4}},
           "identification": {"rank1": 0.8, "map_at_r": 0.3}, "distillation": {"teacher_cosine": 0.7}}
EXPECTED = {"tar_at_far_1e-03": 0.4, "auc": 0.9, "rank1": 0.8, "map_at_r": 0.3, "neg_eer": -0.12, "teacher_cosine": 0.7}


def test_every_selection_metric_is_read_from_the_metrics_dict():
    assert set(SELECTION_METRICS.names()) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert selection_value(METRICS, name) == pytest.approx(value), name


def test_an_undefined_metric_is_none_and_an_unknown_one_an_error():
    undefined = {"verification": {"auc": 0.9, "eer": None, "tar_at_far": {"1e-03": None}}, "identification": {}}
    assert selection_value(undefined, "tar_at_far_1e-03") is None
    assert selection_value(undefined, "neg_eer") is None
    assert selection_value(undefined, "rank1") is None
    assert selection_value(undefined, "teacher_cosine") is None  # not a distillation run
    assert selection_value(undefined, "auc") == pytest.approx(0.9)
    with pytest.raises(InputError, match="unknown selection metric 'eer'; choose one of tar_at_far_1e-03, auc"):
        selection_value(METRICS, "eer")


def test_bin_metrics_select_by_a_val_bin_sets_accuracy_and_need_the_set():
    from facesiam.config import config_from_overrides

    assert selection_value({"bin": {"cfp_fp": {"accuracy_mean": 0.93}}}, "bin:cfp_fp") == pytest.approx(0.93)
    assert selection_value({"bin": {"lfw": {"accuracy_mean": 0.99}}}, "bin:cfp_fp") is None
    assert "bin:lfw" in SELECTION_METRICS and "bin:" not in SELECTION_METRICS
    cfg = config_from_overrides(None, {"val_bin": "sets/lfw.bin, sets/cfp_fp.bin", "best_metric": "bin:cfp_fp"})
    assert cfg.best_metric == "bin:cfp_fp"
    with pytest.raises(InputError, match=r"bin:agedb_30 .* which val_bin does not list \(lfw, cfp_fp\)"):
        config_from_overrides(None, {"val_bin": "sets/lfw.bin,sets/cfp_fp.bin", "best_metric": "bin:agedb_30"})
    with pytest.raises(InputError, match="two verification sets are called 'lfw'"):
        config_from_overrides(None, {"val_bin": "a/lfw.bin,b/lfw.bin", "best_metric": "bin:lfw"})
