"""Distillation: the teacher pass and its cache, the distillation loss, and starting from a facesiam checkpoint."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facesiam.data import ShardDataset
from facesiam.distill import DistillCriterion, teacher_cosine
from facesiam.training import teacher_pass
from tests.conftest import run_distributed, run_python
from tests.training.distill_helpers import FakeTeacher, fill_on_rank, targets


@pytest.fixture
def shards(synthetic_shards, tmp_path):
    """A private copy of the synthetic shards: the cache is written beside them."""
    return shutil.copytree(synthetic_shards, tmp_path / "shards")


def expected(shards, split="train"):
    """What the teacher gives each photo, computed directly (no cache, no chunks)."""
    ds, teacher = ShardDataset(shards, split), FakeTeacher()
    emb, found = np.zeros((len(ds), teacher.dim), np.float32), np.zeros(len(ds), bool)
    for i in range(len(ds)):
        p = teacher.prepare(ds[i][0])
        if p.input is not None:
            emb[i], found[i] = teacher.embed([p.input])[0], True
    return emb, found


def test_the_teacher_pass_embeds_every_photo_once_and_reuses_its_cache(shards, monkeypatch):
    monkeypatch.setattr(teacher_pass, "CHUNK", 16)
    want_emb, want_found = expected(shards)
    assert 0 < want_found.sum() < len(want_found), "the stand-in teacher must miss some photos and find others"
    teacher = FakeTeacher()
    emb, found = targets(shards, teacher, batch_size=5)
    np.testing.assert_allclose(emb[found], want_emb[want_found], atol=1e-6)
    np.testing.assert_array_equal(found, want_found)
    assert teacher.prepared == len(found) and teacher.embed_calls >= want_found.sum() / 5

    (cache,) = (shards / teacher_pass.CACHE_DIR).iterdir()
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["found_by"] == {"none": int((~want_found).sum()), "teacher": int(want_found.sum()), "landmarks": 0}
    ds = ShardDataset(shards, "train")
    assert meta["no_face"] == [ds.paths[i] for i in np.flatnonzero(~want_found)]  # reported, never dropped silently
    assert not list(cache.glob("chunk-*"))

    again = FakeTeacher()
    emb2, found2 = targets(shards, again)
    assert again.prepared == 0 and np.array_equal(emb2, emb) and np.array_equal(found2, found)  # from the cache

    other = FakeTeacher(tag="b")  # another teacher (its fingerprint differs): a cache of its own
    targets(shards, other)
    assert other.prepared == len(found) and len(list((shards / teacher_pass.CACHE_DIR).iterdir())) == 2


def test_remade_shards_invalidate_the_cache(shards):
    targets(shards, FakeTeacher())
    meta = shards / "dataset.json"
    meta.write_text(meta.read_text().replace('"options"', '"remade": 1, "options"', 1))
    teacher = FakeTeacher()
    targets(shards, teacher)
    assert teacher.prepared == len(ShardDataset(shards, "train"))


def test_a_pass_killed_mid_way_resumes_at_its_first_missing_chunk(shards, monkeypatch):
    n = len(ShardDataset(shards, "train"))
    proc = run_python(["-m", "tests.training.distill_helpers", str(shards), "16", "3"], check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    (cache,) = (shards / teacher_pass.CACHE_DIR).iterdir()
    left = sorted(cache.glob("chunk-*.npz"))
    assert 0 < len(left) < -(-n // 16) and not (cache / "meta.json").exists()
    assert not list(cache.glob(".*.tmp")), "a chunk is written whole or not at all"

    monkeypatch.setattr(teacher_pass, "CHUNK", 16)
    teacher = FakeTeacher()
    emb, found = targets(shards, teacher)
    assert teacher.prepared == n - 16 * len(left)  # only the missing chunks
    want_emb, want_found = expected(shards)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_allclose(emb, want_emb, atol=1e-6)


def test_two_ranks_split_the_pass_and_load_the_same_cache(shards):
    results = run_distributed(fill_on_rank, 2, str(shards), 16)
    n = len(ShardDataset(shards, "train"))
    (emb0, found0, prepared0), (emb1, found1, prepared1) = results
    assert prepared0 + prepared1 == n and prepared0 > 0 and prepared1 > 0  # each rank did its share, once
    want_emb, want_found = expected(shards)
    for emb, found in ((emb0, found0), (emb1, found1)):
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_allclose(emb, want_emb, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the loss

def test_the_loss_is_one_minus_cosine_over_photos_with_a_target():
    torch.manual_seed(0)
    targets = F.normalize(torch.randn(10, 4), dim=1)
    found = torch.tensor([True] * 8 + [False] * 2)
    crit = DistillCriterion(embedding_dim=4, teacher_dim=4)
    crit.set_targets(targets, found)
    assert crit.projection is None  # same size: the student's embedding itself learns the teacher's
    emb = F.normalize(torch.randn(6, 4), dim=1)
    idx = torch.tensor([0, 3, 8, 5, 9, 1])
    loss, value = crit(emb, idx)
    keep = found[idx]
    want = (1 - (emb[keep] * targets[idx][keep]).sum(1)).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6) and value.item() == pytest.approx(want.item())
    assert crit(targets[idx], idx)[0].item() == pytest.approx(0.0, abs=1e-6)  # the teacher's own: no loss


def test_the_relational_term_matches_the_batch_similarity_matrices():
    torch.manual_seed(1)
    targets = F.normalize(torch.randn(5, 3), dim=1)
    crit = DistillCriterion(embedding_dim=6, teacher_dim=3, relational_weight=2.0)
    crit.set_targets(targets, torch.ones(5, dtype=torch.bool))
    assert crit.projection is not None and crit.projection.weight.shape == (3, 6)
    emb = F.normalize(torch.randn(5, 6), dim=1)
    idx = torch.arange(5)
    loss, _ = crit(emb, idx)
    proj = F.normalize(crit.projection(emb), dim=1)
    cosine = (1 - (proj * targets).sum(1)).mean()
    relational = ((emb @ emb.t() - targets @ targets.t()) ** 2).mean()
    assert loss.item() == pytest.approx((cosine + 2.0 * relational).item(), abs=1e-5)
    loss.backward()
    assert crit.projection.weight.grad is not None


def test_the_bank_term_matches_similarity_distributions_over_the_teachers_bank():
    """distill.bank_weight: KL(teacher || student) of softmax(cosines / T) over the targets of the photos with a face,
    computed here with scipy (softmax, relative entropy)."""
    from scipy.special import softmax
    from scipy.stats import entropy

    torch.manual_seed(2)
    targets = F.normalize(torch.randn(12, 4), dim=1)
    found = torch.tensor([True] * 10 + [False] * 2)
    crit = DistillCriterion(embedding_dim=4, teacher_dim=4, bank_weight=0.5, bank_temperature=0.1)
    crit.set_targets(targets, found)
    torch.testing.assert_close(crit.bank, targets[:10])  # the photos without a face are no anchor
    emb = F.normalize(torch.randn(5, 4), dim=1)
    idx = torch.tensor([0, 11, 4, 7, 2])  # 11: no target, counts for nothing
    loss, _ = crit(emb, idx)
    bank = targets[:10].numpy().astype(np.float64)
    keep = found[idx].numpy()
    e, t = emb.numpy()[keep].astype(np.float64), targets[idx].numpy()[keep].astype(np.float64)
    kl = [entropy(softmax(ti @ bank.T / 0.1), softmax(ei @ bank.T / 0.1)) for ei, ti in zip(e, t)]
    want = np.mean(1 - np.sum(e * t, axis=1)) + 0.5 * np.mean(kl)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert crit(targets[idx], idx)[0].item() == pytest.approx(0.0, abs=1e-5)  # the teacher's own: no loss


def test_a_bank_larger_than_bank_size_is_one_fixed_subset():
    targets = F.normalize(torch.randn(50, 4), dim=1)
    banks = []
    for _ in range(2):  # two processes, or a run and its resume
        crit = DistillCriterion(embedding_dim=4, teacher_dim=4, bank_weight=1.0, bank_size=16)
        crit.set_targets(targets, torch.ones(50, dtype=torch.bool))
        banks.append(crit.bank)
    assert banks[0].shape == (16, 4)
    torch.testing.assert_close(banks[0], banks[1])
    rows = [int(torch.nonzero((crit.targets == row).all(dim=1))) for row in banks[0]]
    assert rows == sorted(set(rows)) and rows != list(range(16))  # distinct photos, in order, not just the first


def test_the_label_loss_is_added_on_the_photos_labels():
    """distill.label_weight: distillation + w x the metric loss on labels[indices], the latter computed by PML."""
    from pytorch_metric_learning import distances, losses as pml_losses

    from facesiam.config import LossConfig
    from facesiam.losses import Criterion

    torch.manual_seed(2)
    targets = F.normalize(torch.randn(12, 8), dim=1)
    labels = torch.arange(12) // 2  # 6 people, 2 photos each
    cfg = LossConfig(loss="triplet", margin=0.1, distance="cosine", miner="none")
    crit = DistillCriterion(8, 8, label_loss=Criterion(cfg, 8, num_classes=6), label_weight=0.5)
    crit.set_targets(targets, torch.ones(12, dtype=torch.bool))
    crit.set_labels(labels.numpy())
    idx = torch.tensor([4, 5, 0, 1, 10, 11, 7, 6])
    emb = F.normalize(torch.randn(8, 8), dim=1)
    loss, value = crit(emb, idx)
    distill = (1 - (emb * targets[idx]).sum(1)).mean()
    triplet = pml_losses.TripletMarginLoss(margin=0.1, distance=distances.CosineSimilarity())(emb, labels[idx])
    assert triplet.item() > 0  # the check below would not see a dropped label term otherwise
    assert loss.item() == pytest.approx((distill + 0.5 * triplet).item(), abs=1e-5)
    assert value.item() == pytest.approx(loss.item())
    no_labels = DistillCriterion(8, 8, label_loss=Criterion(cfg, 8, num_classes=6), label_weight=0.0)
    assert no_labels.label_loss is None  # weight 0: distillation alone, exactly as before


@pytest.mark.parametrize("flags, message", [
    (["--label-weight", "1"], "set distill.teacher"),
    (["--label-weight", "1", "--teacher", "dlib", "--loss", "triplet", "--m-per-class", "1"], "--m-per-class 2"),
    (["--label-weight", "-1", "--teacher", "dlib"], "label_weight must be >= 0"),
])
def test_label_weight_is_checked_before_anything_runs(flags, message, tmp_path):
    from facesiam.commands.train import main

    with pytest.raises(SystemExit, match=re.escape(message)):  # the command's one-line error
        main(["--data", str(tmp_path), "--output", str(tmp_path / "run"), "--batch-size", "8", *flags])


def test_teacher_cosine_is_the_mean_over_photos_with_a_target():
    rng = np.random.default_rng(0)
    t = rng.normal(size=(6, 4)).astype(np.float32)
    s = rng.normal(size=(6, 4)).astype(np.float32)
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    found = np.array([1, 1, 0, 1, 0, 1], bool)
    crit = DistillCriterion(4, 4)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    assert teacher_cosine(crit, s, t, found) == pytest.approx(float((s * tn).sum(1)[found].mean()), abs=1e-6)
    assert teacher_cosine(crit, s, t, np.zeros(6, bool)) is None


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def teacher_onnx(tmp_path_factory):
    return _teacher_onnx(tmp_path_factory.mktemp("teacher"))


def _teacher_onnx(tmp_path):
    """A tiny facesiam model exported to ONNX: the teacher. Its face head (BatchNorm last) spreads its embeddings
    over the sphere (mean cosine between photos ~0.3), so reproducing it means matching each photo, not one
    direction."""
    from facesiam.config import ModelConfig
    from facesiam.export import export_onnx
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=32, image_size=32, head="face")
    best = export_model(build_model(cfg), cfg, tmp_path / "teacher" / "best")
    export_onnx(best, tmp_path / "teacher.onnx")
    return tmp_path / "teacher.onnx"


DISTILL_FLAGS = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--head", "face",
                 "--batch-size", "16", "--m-per-class", "1", "--lr", "3e-3", "--scheduler", "cosine",
                 "--warmup-steps", "10", "--crop-scale", "1,1", "--rotation", "0", "--hflip", "0",
                 "--color-jitter", "0", "--num-workers", "0", "--wandb", "off", "--seed", "1"]


def _student_vs_teacher(run, shards) -> tuple[float, float]:
    """Mean cosine of the student's embedding of each training photo with the teacher's (from the cache), and the
    share of photos whose nearest teacher embedding among all photos' is their own."""
    from facesiam.eval.embed import embed_path

    (cache,) = (shards / teacher_pass.CACHE_DIR).glob("*-train-*")
    teacher = np.load(cache / "embeddings.npy")
    teacher = teacher - teacher.mean(axis=0)  # the targets are centred (distill.center_targets, the default)
    teacher /= np.linalg.norm(teacher, axis=1, keepdims=True)
    student = embed_path(run, shards, split="train", device="cpu", progress=False)["embeddings"]
    cosine = float((student * teacher).sum(1).mean())
    own = float(((student @ teacher.T).argmax(1) == np.arange(len(teacher))).mean())
    return cosine, own


@pytest.mark.slow
def test_a_student_distilled_from_an_onnx_teacher_reproduces_it(shards, teacher_onnx, tmp_path):
    common = ["launch/train.py", "--data", str(shards), "--teacher", f"onnx:{teacher_onnx}", *DISTILL_FLAGS]
    run_python([*common, "--output", str(tmp_path / "untrained"), "--max-steps", "1", "--lr", "0"])
    proc = run_python([*common, "--output", str(tmp_path / "run"), "--max-steps", "400"])
    assert "student-teacher cosine" in proc.stderr  # validation on the held-out photos reports it
    before, before_own = _student_vs_teacher(tmp_path / "untrained" / "final", shards)
    after, after_own = _student_vs_teacher(tmp_path / "run" / "final", shards)
    assert after >= 0.95 and after > before + 0.3, (before, after)
    assert after_own >= 0.9 and after_own > before_own, (before_own, after_own)
    # Held-out photos (the val split, never trained on): validation logs the student-teacher cosine; it rises.
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held_out = [r["val/teacher_cosine"] for r in logged if "val/teacher_cosine" in r]
    assert len(held_out) >= 2 and held_out[-1] > held_out[0] + 0.2 and held_out[-1] > before + 0.3, held_out


def _weights(ckpt):
    from safetensors.torch import load_file

    return {k: v.numpy() for k, v in load_file(str(ckpt / "model.safetensors")).items()}


@pytest.mark.parametrize("label_flags", [[], ["--label-weight", "0.5", "--loss", "arcface", "--m-per-class", "2"]],
                         ids=["distillation", "with-label-loss"])
def test_distillation_resumes_exactly(shards, teacher_onnx, tmp_path, label_flags):
    from facesiam.commands.train import main
    from tests.conftest import reset_accelerate

    common = ["--data", str(shards), "--teacher", f"onnx:{teacher_onnx}", *DISTILL_FLAGS, "--val-split", "none",
              "--max-steps", "7", "--relational-weight", "0.5", "--embedding-dim", "16",  # with a projection
              "--bank-weight", "0.5", "--bank-size", "8",  # a subset of the photos: it must be the same on resume
              *label_flags]  # the label loss's class centres are trained and checkpointed too
    main([*common, "--output", str(tmp_path / "a")])
    reset_accelerate()
    main([*common, "--output", str(tmp_path / "b"), "--checkpoint-every-steps", "3"])
    reset_accelerate()
    main([*common, "--output", str(tmp_path / "c"), "--resume", str(tmp_path / "b" / "checkpoints" / "step-3")])
    a, c = _weights(tmp_path / "a" / "final"), _weights(tmp_path / "c" / "final")
    for key in a:
        np.testing.assert_array_equal(a[key], c[key], err_msg=key)
    logged = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][0] > 3  # it went on from step 3: trained, not copied


def test_two_processes_distil_with_one_shared_teacher_pass(shards, teacher_onnx, tmp_path):
    from tests.conftest import REPO, accelerate_launch

    accelerate_launch(REPO / "launch" / "train.py", ["--data", str(shards), "--output", str(tmp_path / "run"),
                                                     "--teacher", f"onnx:{teacher_onnx}", *DISTILL_FLAGS,
                                                     "--batch-size", "8", "--max-steps", "6"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6
    caches = sorted(p.name.split("-")[1] for p in (shards / teacher_pass.CACHE_DIR).iterdir())
    assert caches == ["train", "val"]  # one cache per split, written once by the two ranks together
    want_emb, _ = expected_onnx(shards, teacher_onnx)
    (train,) = (shards / teacher_pass.CACHE_DIR).glob("*-train-*")
    np.testing.assert_allclose(np.load(train / "embeddings.npy"), want_emb, atol=1e-5)


def expected_onnx(shards, onnx):
    from facesiam.faces.teachers import build_teacher

    teacher, ds = build_teacher(f"onnx:{onnx}"), ShardDataset(shards, "train")
    prepared = [teacher.prepare(ds[i][0]) for i in range(len(ds))]
    return teacher.embed([p.input for p in prepared]), np.array([p.input is not None for p in prepared])


def test_embed_with_a_teacher_writes_its_embeddings_of_a_split(shards, teacher_onnx, tmp_path):
    """tools/embed.py --teacher: the teacher measured like any model (the same cache a distillation run fills)."""
    from PIL import ImageOps

    from facesiam.commands.embed import main
    from facesiam.eval.embed import load_embeddings
    from facesiam.faces.teachers import build_teacher

    main(["--teacher", f"onnx:{teacher_onnx}", "--data", str(shards), "--split", "train", "--out",
          str(tmp_path / "t.npz")])
    got = load_embeddings(tmp_path / "t.npz")
    want, found = expected_onnx(shards, teacher_onnx)
    assert found.all()
    np.testing.assert_allclose(got["embeddings"], want, atol=1e-5)
    ds = ShardDataset(shards, "train")
    assert list(got["paths"]) == ds.paths and np.array_equal(got["labels"], ds.labels)
    (cache,) = (shards / teacher_pass.CACHE_DIR).glob("*-train-*")  # and a distillation run would reuse it
    assert json.loads((cache / "meta.json").read_text())["photos"] == len(ds)

    # --flip: the teacher with each face's mirror image (distill.teacher_mirror's targets, in a cache of their own)
    main(["--teacher", f"onnx:{teacher_onnx}", "--data", str(shards), "--split", "train", "--out",
          str(tmp_path / "f.npz"), "--flip"])
    flipped = load_embeddings(tmp_path / "f.npz")
    teacher = build_teacher(f"onnx:{teacher_onnx}")
    both = want + teacher.embed([teacher.prepare(ImageOps.mirror(ds[i][0])).input for i in range(len(ds))])
    np.testing.assert_allclose(flipped["embeddings"], both / np.linalg.norm(both, axis=1, keepdims=True), atol=1e-4)
    assert flipped["meta"]["flip"] and len(list((shards / teacher_pass.CACHE_DIR).glob("*-train-*"))) == 2


@pytest.mark.parametrize("center", [True, False])
def test_targets_are_centred_on_the_training_photos_mean(shards, monkeypatch, center):
    """distill.center_targets: the training photos' mean teacher embedding is taken off the train and val targets
    (face descriptors share a large common direction; what is left tells people apart)."""
    from types import SimpleNamespace

    import facesiam.faces.teachers as teachers
    from facesiam.config import config_from_dict
    from facesiam.training.setup import build_distillation

    monkeypatch.setattr(teachers, "build_teacher", lambda spec, **kw: FakeTeacher())
    cfg = config_from_dict({"data": str(shards), "distill": {"teacher": "fake", "teacher_source": "shards",
                                                             "center_targets": center}})
    data = SimpleNamespace(train=ShardDataset(shards, "train"), val=ShardDataset(shards, "val"))
    got = build_distillation(cfg, None, data)  # no Accelerator: one process
    emb, found = expected(shards)
    mean = emb[found].mean(0) if center else 0
    np.testing.assert_allclose(got.train[0][found], emb[found] - mean, atol=1e-6)
    val_emb, val_found = expected(shards, "val")
    np.testing.assert_allclose(got.val[0][val_found], val_emb[val_found] - mean, atol=1e-6)
    assert data.train.return_index  # the training split now yields indices: the targets' rows


def test_a_mirrored_teacher_gives_targets_of_each_photo_and_its_mirror_image_from_a_cache_of_their_own(shards,
                                                                                                      monkeypatch):
    """distill.teacher_mirror: each target is the teacher's embedding of the photo plus that of the photo mirrored
    (PIL's mirror here: the face turned, not the teacher's input), and the plain teacher's cache is not reused."""
    from types import SimpleNamespace

    from PIL import ImageOps

    import facesiam.faces.teachers as teachers
    from facesiam.config import config_from_dict
    from facesiam.training.setup import build_distillation

    monkeypatch.setattr(teachers, "build_teacher", lambda spec, **kw: teachers.MirroredTeacher(FakeTeacher())
                        if kw.get("mirror") else FakeTeacher())
    data = SimpleNamespace(train=ShardDataset(shards, "train"), val=None)
    runs = {}
    for mirror in (False, True):
        cfg = config_from_dict({"data": str(shards), "distill": {
            "teacher": "fake", "teacher_source": "shards", "center_targets": False, "teacher_mirror": mirror}})
        runs[mirror] = build_distillation(cfg, None, data).train
    assert len(list((shards / teacher_pass.CACHE_DIR).glob("*-train-*"))) == 2  # one cache each
    plain, found = expected(shards)
    np.testing.assert_allclose(runs[False][0][found], plain[found], atol=1e-6)
    teacher, ds = FakeTeacher(), data.train
    for i in np.flatnonzero(found)[:20]:
        turned = np.asarray(ImageOps.mirror(ds[i][0]).convert("RGB").resize((4, 4)), np.float32) / 255.0
        want = plain[i] + teacher.embed([turned.reshape(-1)])[0]
        np.testing.assert_allclose(runs[True][0][i], want / np.linalg.norm(want), atol=1e-5)
    assert np.array_equal(runs[True][1], found)


def test_unlabelled_photos_distil_and_a_metric_loss_refuses_them(face_folder, teacher_onnx, tmp_path):
    """make_shards --unlabeled packs photos without identities; only distillation can train on them."""
    from facesiam.commands.make_shards import main as make_shards
    from facesiam.commands.train import main as train
    from tests.conftest import reset_accelerate

    make_shards([str(face_folder), str(tmp_path / "shards"), "--unlabeled", "--workers", "1", "--no-progress"])
    common = ["--data", str(tmp_path / "shards"), *DISTILL_FLAGS, "--max-steps", "3"]
    assert train([*common, "--output", str(tmp_path / "run"), "--teacher", f"onnx:{teacher_onnx}"])["steps"] == 3
    for flags, message in (([], "unlabelled photos"), (["--teacher", f"onnx:{teacher_onnx}", "--m-per-class", "2"],
                                                       "set --m-per-class 1")):
        reset_accelerate()
        with pytest.raises(SystemExit) as exit_:  # SystemExit("train: ..."): printed on one line, exit status 1
            train([*common, "--output", str(tmp_path / "refused"), *flags])
        assert message in str(exit_.value.code) and "\n" not in str(exit_.value.code)
