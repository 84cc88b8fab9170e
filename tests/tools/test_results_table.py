"""tools/results_table.py: one row per run from its report and logs, and mean rows over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ..conftest import load_tool


def _tool():
    return load_tool("results_table")


def _fake_run(root: Path, auc: float, tar: float, rank1: float, rate: float) -> tuple[Path, Path]:
    run, report = root / "run", root / "report"
    run.mkdir(parents=True)
    report.mkdir()
    (report / "metrics.json").write_text(json.dumps({
        "verification": {"auc": auc, "eer": 1 - auc, "tar_at_far": {"1e-03": tar}},
        "identification": {"rank1": rank1}, "pairs": {"accuracy_mean": auc - 0.05, "accuracy_std": 0.02}}))
    # 20 steps of 8 images at `rate` images/s, logged every 10 steps, with a validation record in between.
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 10, "loss": 1.0, "images_per_s": rate, "images_per_s_per_process": rate},
        {"step": 10, "val/auc": auc},
        {"step": 20, "loss": 0.5, "images_per_s": rate, "images_per_s_per_process": rate}]))
    (run / "summary.json").write_text(json.dumps({"steps": 20}))
    (run / "config.yaml").write_text(yaml.safe_dump({"batch_size": 8, "grad_accum_steps": 1}))
    return run, report


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_rows_and_the_mean_of_seeds(tmp_path, capsys):
    values = {"a": (0.90, 0.10, 0.25, 16.0), "b": (0.94, 0.06, 0.29, 8.0)}
    specs = []
    for name, v in values.items():
        run, report = _fake_run(tmp_path / name, *v)
        specs.append(f"{name}={run}:{report}")
    _tool().main([*specs, "--mean", "recipe m=4=a,b"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 3
    a, b, mean = (_cells(line) for line in lines[2:])
    assert a[0] == "a" and a[1] == "160" and float(a[2]) == pytest.approx(0.90)
    assert float(a[7]) == pytest.approx(160 / 16.0 / 60, abs=0.05) and float(a[8]) == pytest.approx(16.0)
    assert mean[0] == "*recipe m=4, mean of 2*"
    for col, key in ((2, 0), (4, 1), (5, 2)):
        assert float(mean[col]) == pytest.approx(np.mean([v[key] for v in values.values()]), abs=1e-4)
    # Mean images/s is total images over total seconds (not the mean of the rates).
    assert float(mean[8]) == pytest.approx(160 / np.mean([160 / 16.0, 160 / 8.0]), abs=0.05)


def test_a_mean_row_follows_the_last_of_its_runs(tmp_path, capsys):
    specs = []
    for name, auc in (("a", 0.90), ("b", 0.94), ("c", 0.70)):
        run, report = _fake_run(tmp_path / name, auc, 0.1, 0.2, 10.0)
        specs.append(f"{name}={run}:{report}")
    _tool().main([*specs, "--mean", "ab=b,a", "--mean", "all=a,b,c"])
    names = [_cells(line)[0] for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert names == ["a", "b", "*ab, mean of 2*", "c", "*all, mean of 3*"]


def test_a_malformed_run_or_an_unknown_name_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _tool().main(["just-a-name"])
    assert "NAME=RUN_DIR:REPORT_DIR" in capsys.readouterr().err
    run, report = _fake_run(tmp_path, 0.9, 0.1, 0.2, 10.0)
    with pytest.raises(SystemExit):
        _tool().main([f"x={run}:{report}", "--mean", "m=x,y"])
    assert "no run named y" in capsys.readouterr().err


def _welch(a: list[float], b: list[float]) -> tuple[float, float]:
    """Welch's t and two-sided p written out (Welch-Satterthwaite degrees of freedom), to check the tool's scipy call."""
    from scipy.stats import t as student_t

    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return abs(t), 2 * student_t.sf(abs(t), dof)


def test_compare_two_recipes_with_welch_t(tmp_path, capsys):
    aucs = {"a0": 0.93, "a1": 0.95, "a2": 0.94, "b0": 0.90, "b1": 0.93, "b2": 0.91, "b3": 0.915}
    specs = []
    for name, auc in aucs.items():
        run, report = _fake_run(tmp_path / name, auc, 0.1 + auc / 10, auc / 3, 10.0)
        specs.append(f"{name}={run}:{report}")
    _tool().main([*specs, "--mean", "ours=a0,a1,a2", "--mean", "seed=b0,b1,b2,b3", "--compare", "ours vs seed"])
    lines = capsys.readouterr().out.strip().splitlines()
    table = {c[0]: c for c in map(_cells, lines[lines.index("") + 3:])}
    assert set(table) == {"AUC", "EER", "TAR@FAR=1e-3", "rank-1", "pairs accuracy"}
    a = [v for k, v in aucs.items() if k[0] == "a"]
    b = [v for k, v in aucs.items() if k[0] == "b"]
    t, p = _welch(a, b)
    assert float(table["AUC"][4]) == pytest.approx(t, abs=0.05)
    assert float(table["AUC"][5]) == pytest.approx(p, abs=1e-3)
    # Higher AUC is better, lower EER is better: both name the same recipe here (EER = 1 - AUC in the fake runs).
    assert table["AUC"][3] == "ours" and table["EER"][3] == "ours"
    assert float(table["EER"][4]) == pytest.approx(t, abs=0.05)


def _mann_whitney_exact(a: list[float], b: list[float]) -> float:
    """Two-sided p of U by enumerating every split of the pooled values (no ties), to check the tool's scipy call."""
    from itertools import combinations

    pooled = a + b

    def u(x):
        return sum(xi > yj for xi in x for yj in pooled if yj not in x)

    centre = len(a) * len(b) / 2
    observed = abs(u(a) - centre)
    splits = [abs(u(list(x)) - centre) for x in combinations(pooled, len(a))]
    return sum(d >= observed - 1e-12 for d in splits) / len(splits)


def test_compare_covers_the_rest_of_the_roc_and_identification(tmp_path, capsys):
    # Group a wins TAR@1e-1 in every run; TAR@1e-4 interleaves; rank-5 and MAP@R are present in every report.
    tar1 = {"a0": 0.81, "a1": 0.83, "a2": 0.82, "b0": 0.75, "b1": 0.77, "b2": 0.74}
    tar4 = {"a0": 0.021, "a1": 0.025, "a2": 0.018, "b0": 0.022, "b1": 0.019, "b2": 0.024}
    specs = []
    for name in tar1:
        run, report = _fake_run(tmp_path / name, tar1[name] + 0.1, tar4[name] * 5, tar1[name] - 0.55, 10.0)
        m = json.loads((report / "metrics.json").read_text())
        m["verification"]["tar_at_far"].update({"1e-01": tar1[name], "1e-02": tar1[name] - 0.45, "1e-04": tar4[name]})
        m["identification"].update({"rank5": tar1[name] - 0.2, "map_at_r": tar1[name] - 0.5})
        (report / "metrics.json").write_text(json.dumps(m))
        specs.append(f"{name}={run}:{report}")
    _tool().main([*specs, "--mean", "a=a0,a1,a2", "--mean", "b=b0,b1,b2", "--compare", "a vs b"])
    lines = capsys.readouterr().out.strip().splitlines()
    table = {c[0]: c for c in map(_cells, lines[lines.index("") + 3:])}
    assert {"TAR@FAR=1e-1", "TAR@FAR=1e-2", "TAR@FAR=1e-4", "rank-5", "MAP@R"} <= set(table)
    for column, values in (("TAR@FAR=1e-1", tar1), ("TAR@FAR=1e-4", tar4)):
        a = [v for k, v in values.items() if k[0] == "a"]
        b = [v for k, v in values.items() if k[0] == "b"]
        assert float(table[column][1]) == pytest.approx(np.mean(a), abs=1e-4)
        assert float(table[column][4]) == pytest.approx(_welch(a, b)[0], abs=0.05)
        assert float(table[column][6]) == pytest.approx(_mann_whitney_exact(a, b), abs=1e-3)
    assert float(table["TAR@FAR=1e-1"][6]) == pytest.approx(2 / 20, abs=1e-3)  # every a above every b: 2 of 20 splits
    assert table["rank-5"][3] == "a" and table["MAP@R"][3] == "a"


def test_compare_needs_two_mean_groups_of_two(tmp_path, capsys):
    run, report = _fake_run(tmp_path, 0.9, 0.1, 0.2, 10.0)
    with pytest.raises(SystemExit):
        _tool().main([f"x={run}:{report}", "--mean", "one=x", "--compare", "one vs two"])
    out, err = capsys.readouterr()
    assert "two labels given to --mean" in err
    assert out == ""  # checked before the table is printed: no half output
    with pytest.raises(SystemExit):
        _tool().main([f"x={run}:{report}", f"y={run}:{report}", "--mean", "one=x", "--mean", "two=x,y",
                      "--compare", "one vs two"])
    assert "at least 2 runs" in capsys.readouterr().err


def test_first_reach_finds_the_budget_at_which_a_run_matches_the_other_recipes_mean(tmp_path, capsys):
    specs = []
    for name, auc in (("b0", 0.90), ("b1", 0.92)):  # recipe B's finals: AUC mean 0.91, EER mean 1 - 0.91 = 0.09
        run, report = _fake_run(tmp_path / name, auc, 0.3, 0.5, 10.0)
        specs.append(f"{name}={run}:{report}")
    run, report = _fake_run(tmp_path / "a0", 0.93, 0.1, 0.2, 10.0)
    curve = [{"step": 10, "val/auc": 0.85, "val/eer": 0.08, "val/tar_at_far_1e-03": 0.1, "val/rank1": 0.2},
             {"step": 20, "val/auc": 0.93, "val/eer": 0.07, "val/tar_at_far_1e-03": 0.2, "val/rank1": 0.5}]
    train = [{"step": step, "loss": 1.0, "images_per_s": 10.0, "images_per_s_per_process": 10.0} for step in (10, 20)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in curve + train))
    specs.append(f"a0={run}:{report}")
    _tool().main([*specs, "--mean", "A=a0", "--mean", "B=b0,b1", "--first-reach", "A vs B"])
    lines = capsys.readouterr().out.strip().splitlines()
    header, _, a0 = map(_cells, lines[lines.index("") + 1:])
    assert header[1:] == ["AUC 0.9100", "EER 0.0900", "TAR@FAR=1e-3 0.3000", "rank-1 0.5000"]
    # 8 images per step: AUC first >= 0.91 at step 20, EER first <= 0.09 at step 10, TAR never >= 0.3, rank-1 at 20.
    assert a0 == ["a0", "160 (0.930)", "80 (0.080)", "not reached", "160 (0.500)"]
    with pytest.raises(SystemExit):
        _tool().main([*specs, "--mean", "A=a0", "--first-reach", "A vs nope"])
    out, err = capsys.readouterr()
    assert "--first-reach 'A vs nope'" in err and out == ""
