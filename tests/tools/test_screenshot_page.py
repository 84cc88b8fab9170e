"""tools/screenshot_page.py: held-out people chosen from the shards' alignment record, and the whole screenshot --
a real serve, enrolment over HTTP, the page in headless Chromium -- with a tiny random model on a few LFW people.

The shards are made here (MTCNN alignment, as make_shards --align) from six LFW people of ../shared/data with at
least two photos, four of them held out; which of those have two single-face photos is read back from the
alignment record the test's shards carry, independently of the tool.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ..conftest import REPO, load_tool, run_python, shared_dataset

HELD_OUT = 4
WINDOW = (1000, 800)


def _tool():
    return load_tool("screenshot_page")


@pytest.fixture(scope="module")
def lfw_shards(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(shards, photos, held-out names): six LFW people with >= 2 photos, aligned and packed, four held out."""
    pytest.importorskip("facenet_pytorch", reason="the shards are aligned with MTCNN (facenet-pytorch)")
    from facesiam.faces.folder import align_shards

    lfw = shared_dataset("lfw-devtrain")
    names = [p.name for p in sorted(lfw.iterdir()) if p.is_dir() and len(list(p.iterdir())) >= 2][:6]
    root = tmp_path_factory.mktemp("screenshot")
    for name in names:
        shutil.copytree(lfw / name, root / "photos" / name)
    align_shards(root / "photos", root / "shards", multi="central", workers=1, progress=False,
                 val_identities=names[:HELD_OUT], seed=0)
    return root / "shards", root / "photos", names[:HELD_OUT]


def _eligible(shards: Path) -> dict[str, list[str]]:
    """Held-out people with >= 2 photos whose alignment found one face: {name: their original photos}."""
    meta = json.loads((shards / "dataset.json").read_text())
    held_out = set(meta["splits"]["val"]["identities"])
    photos: dict[str, list[str]] = {}
    for r in meta["alignment"]["images"]:
        name = r["path"].split("/")[0]
        if name in held_out and r["output"] and r["faces"] == 1:
            photos.setdefault(name, []).append(r["path"])
    return {n: sorted(p) for n, p in photos.items() if len(p) >= 2}


def test_held_out_people_have_two_single_face_photos(lfw_shards):
    shards, photos, held_out = lfw_shards
    eligible = _eligible(shards)
    assert 2 <= len(eligible) <= HELD_OUT  # the six LFW people make a real choice (else the data changed)
    tool = _tool()
    people, folder = tool.held_out_people(shards, "val", None, len(eligible), seed=0)
    assert folder == photos  # the record's source by default
    assert sorted(p.name for p in people) == sorted(eligible)
    for p in people:
        assert p.enrolled != p.grouped and {p.enrolled, p.grouped} <= set(eligible[p.name])
    again, _ = tool.held_out_people(shards, "val", photos, 2, seed=0)
    assert again == tool.held_out_people(shards, "val", photos, 2, seed=0)[0]  # deterministic
    assert {p.name for p in again} <= set(eligible)


def test_held_out_people_errors(lfw_shards, tmp_path):
    from facesiam.errors import InputError

    shards, photos, _ = lfw_shards
    tool = _tool()
    with pytest.raises(InputError, match="only .* people of the 'val' split .* --people"):
        tool.held_out_people(shards, "val", photos, HELD_OUT + 1, seed=0)
    with pytest.raises(InputError, match="no 'test' split"):
        tool.held_out_people(shards, "test", photos, 1, seed=0)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(InputError, match="not found: --photos must be the folder of original photos"):
        tool.held_out_people(shards, "val", tmp_path / "elsewhere", 1, seed=0)


@pytest.mark.slow  # ~1-2 min: MTCNN in serve, Chromium
@pytest.mark.timeout(900)
def test_screenshot_of_the_page_naming_held_out_people(lfw_shards, aligned_model, tmp_path):
    pytest.importorskip("selenium.webdriver", reason="the screenshot needs selenium (the dev extra)")
    for module in ("httpx", "fastapi", "uvicorn"):
        pytest.importorskip(module, reason='the screenshot needs: pip install -e ".[serve]"')
    if not ((shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome"))
            and shutil.which("chromedriver")):
        pytest.skip("no Chromium + chromedriver: apt-get install chromium chromium-driver")
    shards, photos, _ = lfw_shards
    eligible = _eligible(shards)
    people = len(eligible)
    # a report whose far=1e-3 threshold (serve's default point) is -1: every face gets its nearest person's name
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "metrics.json").write_text(json.dumps(
        {"verification": {"threshold_at_far": {"1e-03": -1.0}, "tar_at_far": {"1e-03": 1.0}}}))
    out = tmp_path / "docs" / "page.png"
    proc = run_python([str(REPO / "tools" / "screenshot_page.py"), "--checkpoint", str(aligned_model),
                       "--report", str(tmp_path / "report"), "--data", str(shards), "--photos", str(photos),
                       "--out", str(out), "--people", str(people), "--window", f"{WINDOW[0]}x{WINDOW[1]}"],
                      timeout=600)
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("threshold -1.0000 (") and "far=1e-3" in lines[0], lines

    shown = {}
    for line in lines:
        m = re.fullmatch(r"(.+): enrolled (\S+), in the group picture (\S+)", line)
        if m:
            shown[m[1]] = (m[2], m[3])
    assert len(shown) == people
    for name, (enrolled, grouped) in shown.items():  # a different photo of the same held-out person
        folder = name.replace(" ", "_")
        assert enrolled != grouped and {enrolled, grouped} <= set(eligible[folder]), (name, eligible)

    faces = [re.fullmatch(r"face (\d+): (.+): answered (.+), similarity (-?[\d.]+) \((right|WRONG)\)", line)
             for line in lines if line.startswith("face ")]
    assert all(faces), lines  # below a threshold of -1 nothing is unknown
    assert [int(m[1]) for m in faces] == list(range(1, len(faces) + 1))
    assert {m[2] for m in faces} == set(shown)  # every person's photo had its face found, no stray face
    assert len(faces) == people
    for m in faces:
        assert m[3] in shown and -1 <= float(m[4]) <= 1 + 1e-6
        assert (m[5] == "right") == (m[3] == m[2])
    right = sum(m[5] == "right" for m in faces)
    assert lines[-1].startswith(f"named correctly: {right} of {people} (threshold -1.0000)")

    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == WINDOW
        assert len(png.convert("RGB").getcolors(1 << 20) or [0] * 1000) > 256  # a page with photos, not blank
    assert sorted(p.name for p in out.parent.iterdir()) == ["page.png"]  # no temporary file left beside it
