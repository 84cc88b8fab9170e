"""fileio: directory replacement that is whole before and after, and recovery from a kill between its renames."""

from __future__ import annotations

import os

from facesiam.fileio import recover_directory, staged_directory


def write(directory, text):
    with staged_directory(directory, last="done") as tmp:
        (tmp / "data").write_text(text)
        (tmp / "done").write_text("")


def test_a_kill_between_the_two_renames_is_undone(tmp_path):
    dst = tmp_path / "g"
    write(dst, "v1")
    # the first rename of a replace happened, the second did not (kill -9 in between): dst is gone
    os.replace(dst, tmp_path / ".g.old-12345")
    staging = tmp_path / ".g.tmp-abc"
    staging.mkdir()
    (staging / "data").write_text("v2 (half written)")
    assert recover_directory(dst, marker="done", clean_staging=True)
    assert (dst / "data").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_recovery_leaves_a_whole_directory_alone(tmp_path):
    dst = tmp_path / "g"
    write(dst, "v1")
    write(dst, "v2")
    (tmp_path / ".g.old-999").mkdir()  # killed after the second rename, before the old copy was deleted
    (tmp_path / ".g.old-999" / "done").write_text("")
    staging = tmp_path / ".g.tmp-xyz"
    staging.mkdir()
    assert not recover_directory(dst, marker="done")
    assert (dst / "data").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".g.tmp-xyz", "g"]  # staging kept unless asked
    # an old copy without its marker is not a directory to restore
    os.replace(dst, tmp_path / ".g.old-1")
    (tmp_path / ".g.old-1" / "done").unlink()
    assert not recover_directory(dst, marker="done") and not dst.exists()
