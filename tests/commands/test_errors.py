"""The one error path: expected failures end with one line naming the file and the fix, status 1, no traceback;
anything unexpected keeps its traceback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from facesiam.commands.compare import main as compare_main
from facesiam.commands.embed import main as embed_main
from facesiam.commands.evaluate import main as evaluate_main
from facesiam.eval.embed import save_embeddings

from ..conftest import REPO, run_python


def _one_line_error(run, argv) -> str:
    """Run a command's main; it must exit with status 1 and a single-line message, which is returned."""
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    message = exit_info.value.code
    assert isinstance(message, str), f"expected a message (exit status 1), got exit code {message!r}"
    assert "\n" not in message
    return message


def _copy_model(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_truncated_weights_file_names_the_file_and_the_fix(tiny_model_dir, face_folder, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    image = str(next(face_folder.rglob("*.png")))
    message = _one_line_error(compare_main, ["--checkpoint", str(model), image, image, "--device", "cpu"])
    assert message.startswith("compare: ") and str(weights) in message and "corrupt or truncated" in message
    assert "re-export" in message


@pytest.mark.parametrize("change,what", [({"embedding_dim": 64}, "64-d"), ({"backbone": "test_resnet"}, "test_resnet")])
def test_config_that_does_not_match_the_weights_names_both(tiny_model_dir, face_folder, tmp_path, change, what):
    model = _copy_model(tiny_model_dir, tmp_path)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **change}))
    message = _one_line_error(embed_main, ["--checkpoint", str(model), "--data", str(face_folder), "--out",
                                           str(tmp_path / "e.npz"), "--num-workers", "0"])
    assert str(model / "config.json") in message and str(model / "model.safetensors") in message
    assert what in message and "does not match" in message
    if "embedding_dim" in change:
        assert "32-d" in message, "the size the weights really have"
    assert not (tmp_path / "e.npz").exists()


def test_checkpoint_directory_without_the_files(face_folder, tmp_path):
    (tmp_path / "empty_run").mkdir()
    message = _one_line_error(embed_main, ["--checkpoint", str(tmp_path / "empty_run"), "--data", str(face_folder),
                                           "--out", str(tmp_path / "e.npz")])
    assert "empty_run" in message and "model.safetensors" in message and "RUN/best" in message


def test_embeddings_without_classes_or_paths_are_evaluated_and_only_pairs_needs_paths(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), 4)
    emb = rng.normal(size=(6, 16))[labels] + 0.3 * rng.normal(size=(24, 16))
    np.savez(tmp_path / "bare.npz", embeddings=emb.astype(np.float32), labels=labels)
    metrics = evaluate_main(["--embeddings", str(tmp_path / "bare.npz"), "--out", str(tmp_path / "r")])
    assert metrics["n_identities"] == 6 and (tmp_path / "r" / "metrics.json").is_file()
    (tmp_path / "pairs.txt").write_text("1 1\n0 1 2\n0 1 1 1\n")
    message = _one_line_error(evaluate_main, ["--embeddings", str(tmp_path / "bare.npz"), "--out",
                                              str(tmp_path / "p"), "--pairs", str(tmp_path / "pairs.txt")])
    assert "bare.npz has no 'paths' array" in message and "--pairs" in message and "tools/embed.py" in message


def test_missing_split_names_the_dataset_and_its_splits(tiny_model_dir, synthetic_shards, tmp_path):
    message = _one_line_error(embed_main, ["--checkpoint", str(tiny_model_dir), "--data", str(synthetic_shards),
                                           "--split", "test", "--out", str(tmp_path / "e.npz"), "--num-workers", "0"])
    assert str(synthetic_shards / "dataset.json") in message and "'test'" in message and "train, val" in message


def test_pairs_naming_images_that_are_not_in_the_data(tmp_path):
    save_embeddings(tmp_path / "e.npz", np.eye(4, dtype=np.float32), [0, 0, 1, 1],
                    ["a/a_0001.png", "a/a_0002.png", "b/b_0001.png", "b/b_0002.png"], ["a", "b"])
    (tmp_path / "pairs.txt").write_text("1 1\nnobody 1 2\na 1 b 9\n")
    message = _one_line_error(evaluate_main, ["--embeddings", str(tmp_path / "e.npz"), "--out", str(tmp_path / "r"),
                                              "--pairs", str(tmp_path / "pairs.txt")])
    assert "pairs.txt: 2 of 2 pairs name images not in the data" in message and "nobody" in message


def test_the_real_command_prints_one_line_and_exits_1_without_a_traceback(tmp_path):
    proc = run_python([str(REPO / "tools" / "evaluate.py"), "--embeddings", str(tmp_path / "missing.npz"), "--out",
                       str(tmp_path / "r")], check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"evaluate: embeddings file {tmp_path / 'missing.npz'} not found; make it with tools/embed.py --out "
        f"{tmp_path / 'missing.npz'}"]


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    import facesiam.eval.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    save_embeddings(tmp_path / "e.npz", np.eye(4, dtype=np.float32), [0, 0, 1, 1], list("wxyz"), ["a", "b"])
    monkeypatch.setattr(pipeline, "evaluate_embeddings", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        evaluate_main(["--embeddings", str(tmp_path / "e.npz"), "--out", str(tmp_path / "r")])


def test_the_console_script_exits_0_when_a_command_returns_its_summary(face_folder, tmp_path):
    # what pip's `facesiam` script does: sys.exit(cli()); make-shards returns a dict (its summary), which must not
    # become the exit status
    script = ("import sys; from facesiam.commands import cli; "
              f"sys.argv = ['facesiam', 'make-shards', {str(face_folder)!r}, {str(tmp_path / 'shards')!r}, "
              "'--no-progress']; sys.exit(cli())")
    proc = run_python(["-c", script], check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "shards" / "dataset.json").is_file()
    failed = run_python(["-c", script.replace(str(face_folder), str(tmp_path / "absent"))], check=False, timeout=300)
    assert failed.returncode == 1 and "absent" in failed.stderr
