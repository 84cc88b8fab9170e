""".bin verification sets (insightface's lfw.bin format): the field's protocol against a reference written here,
the embedding (image + mirror raw outputs summed), reading every layout the packs use, refusing anything else,
make_bin -> read round trip, evaluate --bin end to end, and a .bin of real LFW photos."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import KFold

from facesiam.commands.evaluate import main as evaluate_main
from facesiam.commands.make_bin import main as make_bin_main
from facesiam.commands.make_pairs import main as make_pairs_main
from facesiam.errors import InputError
from facesiam.eval.verification_bin import (bin_metrics, embed_bin, evaluate_bin_files, kfold_accuracy, read_bin,
                                            write_bin)

from ..conftest import REPO, accelerate_launch, shared_dataset


# ------------------------------------------------------------------------------------------------ the protocol


def reference_protocol(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10):
    """The protocol as described (insightface eval/verification.py), written independently of facesiam's code."""
    norms = np.sqrt((embeddings.astype(np.float64) ** 2).sum(axis=1, keepdims=True))
    emb = embeddings.astype(np.float64) / norms
    dist = ((emb[0::2] - emb[1::2]) ** 2).sum(axis=1)
    thresholds = np.arange(0, 4, 0.01)
    accuracies, chosen = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(len(issame))):
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        chosen.append(best)
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
    return np.mean(accuracies), np.std(accuracies), accuracies, chosen


@pytest.mark.parametrize("n_pairs", [600, 605])  # LFW-like folds, and folds of unequal size
def test_protocol_equals_an_independent_implementation(n_pairs):
    rng = np.random.default_rng(n_pairs)
    issame = rng.random(n_pairs) < 0.5
    first = rng.normal(size=(n_pairs, 64))
    noise = np.where(issame[:, None], 0.9, 2.0) * rng.normal(size=(n_pairs, 64))  # genuine pairs lie closer
    emb = np.empty((2 * n_pairs, 64), np.float32)
    emb[0::2], emb[1::2] = first, first + noise
    mean, std, accuracies, chosen = reference_protocol(emb, issame)
    got = kfold_accuracy(emb, issame)
    assert 0.6 < mean < 1.0, "the data set must be neither trivial nor hopeless for the check to mean anything"
    assert got["accuracy_mean"] == pytest.approx(mean, abs=1e-12)
    assert got["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert [f["accuracy"] for f in got["folds"]] == pytest.approx(accuracies, abs=1e-12)
    assert [f["threshold"] for f in got["folds"]] == pytest.approx(chosen, abs=1e-12)
    assert sum(f["n_pairs"] for f in got["folds"]) == n_pairs
    m = bin_metrics(emb, issame, xnorm=3.0, name="x")
    unit = emb.astype(np.float64) / np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
    cosine = (unit[0::2] * unit[1::2]).sum(axis=1)
    assert m["auc"] == pytest.approx(roc_auc_score(issame, cosine), abs=1e-12)
    assert m["accuracy_mean"] == got["accuracy_mean"] and m["xnorm"] == 3.0
    assert (m["n_pairs"], m["n_same"]) == (n_pairs, int(issame.sum()))


def test_too_few_pairs_for_ten_folds_is_an_error():
    with pytest.raises(InputError, match="9 pairs cannot make 10 folds"):
        kfold_accuracy(np.ones((18, 4), np.float32), np.ones(9, bool))


def _jpeg(seed: int, size: int = 112) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_embedding_sums_the_raw_outputs_of_image_and_mirror(tiny_model_dir, tmp_path):
    from facesiam.data.images import rgb_from_bytes
    from facesiam.model import eval_transform_for, load_exported

    images = [_jpeg(i) for i in range(24)]
    write_bin(tmp_path / "x.bin", images, [i % 2 == 0 for i in range(12)])
    bins = read_bin(tmp_path / "x.bin")
    model, cfg = load_exported(tiny_model_dir)
    transform = eval_transform_for(cfg)
    state = torch.get_rng_state()
    emb, xnorm = embed_bin(model, bins, transform, batch_size=5, num_workers=0)
    assert torch.equal(state, torch.get_rng_state()), "evaluating a .bin must draw nothing from the torch RNG"
    assert not model.training
    with torch.no_grad():  # the network without its final normalisation, on each image and on its mirror
        batch = torch.stack([transform(rgb_from_bytes(raw, "x")) for raw in images])
        raw = model.head(model.trunk(batch)).double()
        mirror = model.head(model.trunk(torch.flip(batch, dims=[3]))).double()
    summed = (raw + mirror).numpy()
    expected = summed / np.linalg.norm(summed, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    norms = torch.cat([raw.norm(dim=1), mirror.norm(dim=1)])
    assert xnorm == pytest.approx(float(norms.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ the file


def _python2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """(images, issame) as Python 2's pickle (protocol 2) writes it: images are py2 str (BINSTRING opcodes)."""
    out = [b"\x80\x02]("]  # PROTO 2, EMPTY_LIST, MARK
    out += [b"T" + struct.pack("<I", len(raw)) + raw for raw in images]
    out += [b"e](", *(b"\x88" if s else b"\x89" for s in issame), b"e\x86."]  # APPENDS, list of bools, TUPLE2, STOP
    return b"".join(out)


@pytest.mark.parametrize("layout", ["python2", "bytes-p2", "bytes-p5", "cv2-arrays-p2", "cv2-arrays-p5",
                                    "column-arrays", "numpy-bools"])
def test_every_layout_of_the_packs_reads_the_same(tmp_path, layout):
    images = [_jpeg(i) for i in range(4)]
    issame = [True, False]
    path = tmp_path / f"{layout}.bin"
    if layout == "python2":
        path.write_bytes(_python2_pickle(images, issame))
    else:
        protocol = 5 if layout.endswith("p5") else 2
        stored: list = images
        if layout.startswith("cv2-arrays"):
            stored = [np.frombuffer(raw, np.uint8).copy() for raw in images]  # cv2.imencode's output
        if layout == "column-arrays":
            stored = [np.frombuffer(raw, np.uint8).reshape(-1, 1) for raw in images]
        flags = [np.bool_(s) for s in issame] if layout == "numpy-bools" else issame
        path.write_bytes(pickle.dumps((stored, flags), protocol=protocol))
    bins = read_bin(path)
    assert bins.images == images and bins.issame.tolist() == issame and bins.name == layout


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_bad_files_are_one_line_errors_and_never_run_code(tmp_path):
    marker = tmp_path / "ran"
    cases = {
        "code.bin": pickle.dumps(([_RunsCode(marker), b"x"], [True])),
        "objects.bin": pickle.dumps(([np.array([None, None], dtype=object)] * 2, [True])),
        "text.bin": b"not a pickle at all",
        "dict.bin": pickle.dumps({"bins": [], "issame": []}),
        "odd.bin": pickle.dumps(([_jpeg(0)] * 3, [True, False])),
        "yaw.bin": pickle.dumps(([_jpeg(0)] * 2, [0.5], [True])),
        "notimage.bin": pickle.dumps(([_jpeg(0), b"\x00" * 50], [True])),
        "flags.bin": pickle.dumps(([_jpeg(0)] * 2, ["yes"])),
    }
    expected = {"code.bin": "posix.mkdir, which a .bin never needs", "objects.bin": "Python objects",
                "text.bin": "not a .bin verification set", "dict.bin": "expected a pair (images, issame_list)",
                "odd.bin": "3 images for 2 pairs", "yaw.bin": "expected a pair", "notimage.bin": "image 1 (pair 0)",
                "flags.bin": "issame_list[0]"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError) as err:
            read_bin(tmp_path / name)
        message = str(err.value)
        assert expected[name] in message and str(tmp_path / name) in message and "\n" not in message, message
        assert "tools/make_bin.py" in message, "the error says how to make a good one"
    assert not marker.exists(), "unpickling must never call what the file names"
    with pytest.raises(FileNotFoundError, match="missing.bin not found"):
        read_bin(tmp_path / "missing.bin")


# ------------------------------------------------------------------------------------------------ make_bin


@pytest.fixture(scope="module")
def aligned_faces(tmp_path_factory):
    """8 synthetic identities x 4 images as 112x112 PNG crops, an LFW-format pairs file and its .bin."""
    from facesiam.synthetic import make_synthetic_faces

    tmp = tmp_path_factory.mktemp("bin")
    faces = make_synthetic_faces(tmp / "faces", 8, 4, size=112, seed=3, workers=1, progress=False)
    make_pairs_main([str(faces), "--out", str(tmp / "pairs.txt"), "--folds", "2", "--pairs-per-fold", "6"])
    make_bin_main([str(faces), str(tmp / "pairs.txt"), str(tmp / "mine.bin")])
    return tmp, faces


def _pairs_in_file_order(pairs_txt, faces):
    """(path1, path2, same) of each line after the header. 'name i' is LFW's file name_000i.jpg when the identity's
    files are named that way, else the i-th file of name in sorted order (the pairs format's rule)."""
    def image(name: str, number: str):
        lfw = faces / name / f"{name}_{int(number):04d}.jpg"
        return lfw if lfw.is_file() else sorted((faces / name).iterdir())[int(number) - 1]

    out = []
    for line in pairs_txt.read_text().splitlines()[1:]:
        tok = line.split()
        n1, i, n2, j = (tok[0], tok[1], tok[0], tok[2]) if len(tok) == 3 else tok
        out.append((image(n1, i), image(n2, j), n1 == n2))
    return out


def test_make_bin_round_trip_keeps_the_files_bytes_in_pair_order(aligned_faces):
    tmp, faces = aligned_faces
    bins = read_bin(tmp / "mine.bin")
    expected = _pairs_in_file_order(tmp / "pairs.txt", faces)
    assert bins.n_pairs == len(expected) == 24 and bins.name == "mine"
    for k, (a, b, same) in enumerate(expected):
        assert bins.images[2 * k] == a.read_bytes() and bins.images[2 * k + 1] == b.read_bytes(), k
        assert bool(bins.issame[k]) == same
    # insightface's own loader reads it: a plain pickle of (list of bytes, list of bool)
    with open(tmp / "mine.bin", "rb") as f:
        images, issame = pickle.load(f, encoding="bytes")
    assert isinstance(images, list) and all(isinstance(b, bytes) for b in images) and issame == bins.issame.tolist()


def test_make_bin_refuses_other_sizes_unless_resize(face_folder, tmp_path):
    make_pairs_main([str(face_folder), "--out", str(tmp_path / "pairs.txt"), "--folds", "2", "--pairs-per-fold", "5"])
    with pytest.raises(SystemExit, match=r"make_bin: .*is 48x48, not 112x112: .*--resize"):
        make_bin_main([str(face_folder), str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin")])
    assert not (tmp_path / "x.bin").exists()
    summary = make_bin_main([str(face_folder), str(tmp_path / "pairs.txt"), str(tmp_path / "x.bin"), "--resize"])
    bins = read_bin(tmp_path / "x.bin")
    assert summary["resized"] == summary["n_images"] > 0 and bins.n_pairs == 20
    for raw in bins.images:
        with Image.open(io.BytesIO(raw)) as im:
            assert im.size == (112, 112) and im.format in ("JPEG", "PNG")


# ------------------------------------------------------------------------------------------------ evaluate --bin


def test_evaluate_bin_end_to_end(aligned_faces, tiny_model_dir, tmp_path):
    tmp, faces = aligned_faces
    other = tmp_path / "cfp_fp.bin"
    write_bin(other, read_bin(tmp / "mine.bin").images[:20], read_bin(tmp / "mine.bin").issame[:10])
    report = tmp_path / "report"
    evaluate_main(["--checkpoint", str(tiny_model_dir), "--bin", f"{tmp / 'mine.bin'},{other}", "--out", str(report),
                   "--num-workers", "0"])
    m = json.loads((report / "metrics.json").read_text())
    direct = evaluate_bin_files(tiny_model_dir, [str(tmp / "mine.bin"), str(other)], progress=False)
    assert set(m["bin"]) == {"mine", "cfp_fp"}
    for name in ("mine", "cfp_fp"):
        got = m["bin"][name]
        assert got["accuracy_mean"] == pytest.approx(direct[name]["accuracy_mean"])
        assert got["auc"] == pytest.approx(direct[name]["auc"]) and got["xnorm"] == pytest.approx(direct[name]["xnorm"])
        assert len(got["folds"]) == 10 and got["n_pairs"] == (24 if name == "mine" else 10)
    text = (report / "report.md").read_text()
    line = f"cfp_fp: {100 * m['bin']['cfp_fp']['accuracy_mean']:.2f} +- {100 * m['bin']['cfp_fp']['accuracy_std']:.2f}"
    assert line + " (10-fold), AUC" in text and "CFP: S. Sengupta" in text and "roc.png" in text
    assert m["source"]["checkpoint"] == str(tiny_model_dir) and "--bin" in m["source"]["command"]
    # With --data too: the data set's metrics and the sets' in one report.
    evaluate_main(["--checkpoint", str(tiny_model_dir), "--data", str(faces), "--bin", str(other), "--out",
                   str(tmp_path / "both"), "--num-workers", "0", "--protocol", "verification"])
    both = json.loads((tmp_path / "both" / "metrics.json").read_text())
    assert both["verification"]["auc"] is not None
    assert both["bin"]["cfp_fp"]["accuracy_mean"] == pytest.approx(m["bin"]["cfp_fp"]["accuracy_mean"])


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(aligned_faces, tiny_model_dir, tmp_path):
    """Under accelerate launch each process embeds its share of the images; the gathered embeddings and the
    XNorm summed over processes are those of one process."""
    tmp, _ = aligned_faces
    accelerate_launch(REPO / "tools" / "evaluate.py", ["--checkpoint", str(tiny_model_dir), "--bin",
                                                       str(tmp / "mine.bin"), "--out", str(tmp_path / "two"),
                                                       "--num-workers", "0", "--batch-size", "7"])
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())["bin"]["mine"]
    one = evaluate_bin_files(tiny_model_dir, [str(tmp / "mine.bin")], batch_size=7, progress=False)["mine"]
    assert two["xnorm"] == pytest.approx(one["xnorm"], rel=1e-5) and two["auc"] == pytest.approx(one["auc"], abs=1e-6)
    assert two["accuracy_mean"] == pytest.approx(one["accuracy_mean"])


def test_evaluate_bin_bad_invocations(aligned_faces, tiny_model_dir, tmp_path, capsys):
    tmp, _ = aligned_faces
    (tmp_path / "bad.bin").write_bytes(b"junk")
    with pytest.raises(SystemExit, match=r"^evaluate: .*bad.bin: not a .bin verification set"):
        evaluate_main(["--checkpoint", str(tiny_model_dir), "--bin", str(tmp_path / "bad.bin"), "--out",
                       str(tmp_path / "r")])
    with pytest.raises(SystemExit) as usage:
        evaluate_main(["--bin", str(tmp / "mine.bin"), "--out", str(tmp_path / "r")])
    assert usage.value.code == 2 and "--bin takes a model" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="two verification sets are called 'mine'"):
        evaluate_main(["--checkpoint", str(tiny_model_dir), "--bin", f"{tmp / 'mine.bin'},{tmp_path / 'mine.bin'}",
                       "--out", str(tmp_path / "r")])


# ------------------------------------------------------------------------------------------------ real photos


def test_a_bin_of_real_lfw_photos(tiny_model_dir, tmp_path):
    lfw = shared_dataset("lfw-devtrain")
    make_pairs_main([str(lfw), "--out", str(tmp_path / "pairs.txt"), "--folds", "10", "--pairs-per-fold", "5"])
    summary = make_bin_main([str(lfw), str(tmp_path / "pairs.txt"), str(tmp_path / "lfw_mine.bin"), "--resize"])
    bins = read_bin(tmp_path / "lfw_mine.bin")
    pairs = _pairs_in_file_order(tmp_path / "pairs.txt", lfw)
    assert bins.n_pairs == len(pairs) == 100 and summary["resized"] == summary["n_images"]
    for k in (0, 57, 99):  # each stored image is its 250x250 photo resized to 112x112 (JPEG at quality 95)
        path, _, same = pairs[k]
        with Image.open(path) as photo:
            want = np.asarray(photo.convert("RGB").resize((112, 112), Image.BICUBIC), np.float64)
        got = np.asarray(Image.open(io.BytesIO(bins.images[2 * k])).convert("RGB"), np.float64)
        assert np.abs(got - want).mean() < 3.0 and bool(bins.issame[k]) == same
    metrics = evaluate_bin_files(tiny_model_dir, [str(tmp_path / "lfw_mine.bin")], progress=False)["lfw_mine"]
    assert 0.0 <= metrics["accuracy_mean"] <= 1.0 and len(metrics["folds"]) == 10 and metrics["xnorm"] > 0
