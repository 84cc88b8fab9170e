"""The README's screenshot of the service's page, made reproducibly: a trained model naming held-out people.

    python tools/screenshot_page.py --checkpoint RUN/final --report REPORT --data lfw_aligned [--split val] \\
        --photos ../shared/data/lfw-devtrain --out docs/images/serve_page.png [--people 4] [--columns 2] [--seed 0]

Starts a real ``facesiam serve`` (tools/serve.py) on a free localhost port with a temporary token and an empty
temporary gallery, enrols K people of the shards' held-out split (``--split val``; people with at least two
single-face photos, chosen with ``--seed``) with ONE original photo each through the HTTP API, puts a DIFFERENT
original photo of each in a grid (the group picture), has the page at / find the faces in headless Chromium
(Chromium + chromedriver from Debian's packages, driven by Selenium: no driver download) and saves the screenshot
atomically. Prints the photos enrolled and grouped, and per face (numbered as on the page) the name and similarity
the service answered, and how many of the K people were named correctly.

The threshold is the service's: ``--report REPORT [--operating-point far=1e-3]`` (serve's default point) or
``--threshold T``. The original photos are found through dataset.json's alignment record (each aligned crop's
source photo), under ``--photos`` (default: the folder the record names). Nothing leaves this machine: the service
listens on 127.0.0.1 and the tool writes only the PNG.
"""

from __future__ import annotations

import argparse
import math
import mimetypes
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the repo's facesiam, as tools/*.py

from facesiam.commands import command  # noqa: E402
from facesiam.commands.common import add_model_choice, add_threshold_arguments  # noqa: E402
from facesiam.errors import InputError  # noqa: E402

CELL = 250  # px: an LFW photo's side; other photos are centre-cropped to it
START_TIMEOUT = 300.0  # s for serve to import torch, load the model and answer /readyz
REQUEST_TIMEOUT = 120.0  # s per HTTP request and per page action
STOP_TIMEOUT = 30.0  # s for serve to drain and exit after SIGTERM before it is killed


class Person(NamedTuple):  # not a dataclass: tests load this script with importlib, outside sys.modules
    name: str  # the identity folder's name (LFW: First_Last)
    enrolled: str  # original photo enrolled, relative to --photos
    grouped: str  # a different original photo, put in the group picture

    @property
    def shown(self) -> str:
        """The name the service stores and the page shows (LFW's underscores as spaces)."""
        return self.name.replace("_", " ")


def held_out_people(data: Path, split: str, photos: Optional[Path], count: int, seed: int) -> tuple[list[Person], Path]:
    """``count`` people of ``split`` with >= 2 usable original photos, chosen with ``seed``, and the photos folder.

    Usable: a photo whose alignment found exactly one face (the record's "faces"), so the group picture has no
    stray faces in the background; shards made without --align use their own files as the photos."""
    from facesiam.data.format import METADATA_FILE, load_index, read_metadata

    meta = read_metadata(data)
    where = data / METADATA_FILE
    if split not in meta["splits"]:
        raise InputError(f"{where}: no {split!r} split (it has {', '.join(meta['splits'])}); choose one with "
                         f"--split, or make the shards with --val-identities to hold people out")
    alignment = meta.get("alignment") or {}
    photos = Path(photos) if photos is not None else Path(alignment.get("source") or meta["source"])
    if not photos.is_dir():
        raise InputError(f"--photos {photos}: not a folder; give the folder of original photos the shards of {data} "
                         f"were made from")
    records = {r["output"]: r for r in alignment.get("images", []) if r.get("output")}
    index = load_index(data, split, meta["splits"][split]["shards"])
    by_person: dict[str, list[str]] = {}
    for label, path in zip(index.label.tolist(), index.paths()):
        record = records.get(path)
        if records and (record is None or record.get("faces") != 1):
            continue
        by_person.setdefault(meta["classes"][label], []).append(record["path"] if record else path)
    eligible = sorted(name for name, paths in by_person.items() if len(paths) >= 2)
    if len(eligible) < count:
        raise InputError(f"{where}: only {len(eligible)} people of the {split!r} split have two photos with one face "
                         f"each; ask for fewer with --people")
    chosen = sorted(np.random.default_rng(seed).choice(len(eligible), count, replace=False).tolist())
    people = [Person(eligible[i], *sorted(by_person[eligible[i]])[:2]) for i in chosen]
    for person in people:
        for rel in (person.enrolled, person.grouped):
            if not (photos / rel).is_file():
                raise InputError(f"{photos / rel} not found: --photos must be the folder of original photos that "
                                 f"{where} was made from (it records {alignment.get('source') or meta['source']})")
    return people, photos


def group_picture(people: Sequence[Person], photos: Path, out: Path, columns: Optional[int] = None) -> int:
    """The people's group photos in a grid of CELL px cells, near-square unless ``columns`` is given (grey where
    empty); returns the columns."""
    columns = min(columns or math.ceil(math.sqrt(len(people))), len(people))
    rows = math.ceil(len(people) / columns)
    group = Image.new("RGB", (columns * CELL, rows * CELL), (128, 128, 128))
    for i, person in enumerate(people):
        with Image.open(photos / person.grouped) as im:
            group.paste(ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (CELL, CELL)),
                        ((i % columns) * CELL, (i // columns) * CELL))
    group.save(out)  # PNG: no second lossy encoding of the photos
    return columns


class Serve:
    """``facesiam serve`` (tools/serve.py) on a free localhost port with a temporary token; stopped on exit."""

    def __init__(self, args: list[str], log: Path):
        import httpx

        from facesiam.testing import free_port

        self.token = secrets.token_urlsafe(32)
        self.url = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "FACESIAM_TOKEN": self.token}
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--host", "127.0.0.1",
                                      "--port", self.url.rsplit(":", 1)[1], *args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT,
                                   headers={"Authorization": f"Bearer {self.token}"})

    def _failed(self, what: str) -> InputError:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
        return InputError(f"serve {what}; its last lines: " + " | ".join(tail))

    def wait(self, timeout: float) -> None:
        """Until GET /readyz answers 200 (model, index and gallery ready)."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._failed(f"exited with status {self.proc.returncode}")
            try:
                if self.client.get("/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise self._failed(f"was not ready within {timeout:g} s")

    def post(self, path: str, **kwargs) -> dict:
        response = self.client.post(path, **kwargs)
        if response.status_code != 200:
            raise InputError(f"serve answered {path} with {response.status_code}: {response.text[:300]}")
        return response.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self.client.close()
        self._log.close()


def browser(window: tuple[int, int]):
    """Headless Chromium driven by Debian's chromedriver (never a downloaded driver), as tests/service/test_page.py."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise InputError("selenium is not installed: pip install -e \".[dev]\" (or pip install selenium)") from None
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        raise InputError("no Chromium + chromedriver on PATH: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--hide-scrollbars",
                 "--force-device-scale-factor=1", f"--window-size={window[0]},{window[1]}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    # the viewport itself at WxH (--window-size sizes the window, whose frame takes part of it): the PNG's size
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": window[0], "height": window[1],
                                                                  "deviceScaleFactor": 1, "mobile": False})
    driver.set_page_load_timeout(REQUEST_TIMEOUT)
    driver.set_script_timeout(REQUEST_TIMEOUT)
    return driver


def recognise_on_page(driver, url: str, token: str, group: Path) -> list[str]:
    """Open the page, give the token, send the group picture to "Who is in this photo?" and wait for the answer
    and the photo; returns the names on the face boxes in the page's (reading) order."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, REQUEST_TIMEOUT)
    driver.get(url + "/")
    driver.find_element(By.ID, "token").send_keys(token)
    driver.find_element(By.ID, "recognize-image").send_keys(str(group.resolve()))
    driver.find_element(By.ID, "recognize-button").click()
    wait.until(lambda d: d.execute_script(
        "const out = document.getElementById('recognize-result');"
        "return out.childElementCount > 0 && !out.querySelector('.pending')"), "no answer on the page")
    errors = driver.find_elements(By.CSS_SELECTOR, "#recognize-result .error")
    if errors:
        raise InputError(f"the page showed an error: {errors[0].text}")
    wait.until(lambda d: d.execute_script(
        "const p = document.getElementById('recognize-photo'); return p.complete && p.naturalWidth > 0"),
        "the group picture never showed")
    # when the photo with its boxes does not fit below the page's header, the answer's section goes to the top
    driver.execute_script(
        "if (document.getElementById('recognize-figure').getBoundingClientRect().bottom > window.innerHeight) {"
        "  document.getElementById('recognize-section').scrollIntoView({block: 'start'}); window.scrollBy(0, -16); }")
    return driver.execute_script("return [...document.querySelectorAll('#recognize-figure .face-box .face-name')]"
                                 ".map(n => n.textContent)")


def page_name(face: dict) -> str:
    """The name the page puts on a face's box (page.html's faceName)."""
    if not face["usable"]:
        return face.get("reason") or "not usable"
    return face["identity"] if face["known"] else "unknown"


def parse_window(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 1200x900") from None
    return width, height


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_model_choice(p, required=True)
    add_threshold_arguments(p, required=True)
    p.add_argument("--data", required=True, help="the shard folder the model was evaluated on (its dataset.json)")
    p.add_argument("--split", default="val", help="the split of held-out people to show (default %(default)s)")
    p.add_argument("--photos", help="the folder of original photos (default: the source dataset.json records)")
    p.add_argument("--out", required=True, help="the screenshot (PNG), written atomically")
    p.add_argument("--people", type=int, default=4, help="people enrolled and in the group picture (default 4)")
    p.add_argument("--columns", type=int, default=None, help="photos per row of the group picture (default: a "
                   "near-square grid, 2x2 for 4 people; --columns 4: one row, and the page's header stays in view)")
    p.add_argument("--seed", type=int, default=0, help="which people (default %(default)s)")
    p.add_argument("--window", type=parse_window, default=(1200, 900), metavar="WxH",
                   help="browser window, the screenshot's size in pixels (default 1200x900)")
    p.add_argument("--start-timeout", type=float, default=START_TIMEOUT,
                   help="seconds serve may take to be ready (default %(default)g)")
    return p


def serve_args(args: argparse.Namespace, gallery: Path) -> list[str]:
    model = ["--checkpoint", args.checkpoint] if args.checkpoint else ["--onnx", args.onnx]
    decide = ([f"--threshold={args.threshold!r}"] if args.threshold is not None
              else ["--report", args.report, "--operating-point", args.operating_point])
    return [*model, *decide, "--gallery", str(gallery)]


@command("screenshot_page")
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parser().parse_args(argv)
    if args.people < 1 or (args.columns is not None and args.columns < 1):
        raise InputError(f"--people {args.people} --columns {args.columns}: give at least 1 of each")
    from facesiam.eval.compare import decision_threshold
    from facesiam.fileio import atomic_write

    threshold, source = decision_threshold(args.threshold, args.report, args.operating_point)  # fails early
    people, photos = held_out_people(Path(args.data), args.split, args.photos, args.people, args.seed)
    print(f"threshold {threshold:.4f} ({source})")
    for person in people:
        print(f"{person.shown}: enrolled {person.enrolled}, in the group picture {person.grouped}")
    with tempfile.TemporaryDirectory(prefix="facesiam-screenshot-") as tmp:
        tmp = Path(tmp)
        group = tmp / "group.png"
        columns = group_picture(people, photos, group, args.columns)
        driver = browser(args.window)  # first: no browser, no need to start serve
        try:
            server = Serve(serve_args(args, tmp / "gallery"), tmp / "serve.log")
            try:
                server.wait(args.start_timeout)
                for person in people:
                    path = photos / person.enrolled
                    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                    server.post("/enroll", data={"identity": person.shown},
                                files={"images": (path.name, path.read_bytes(), kind)})
                shown = recognise_on_page(driver, server.url, server.token, group)
                png = driver.get_screenshot_as_png()
                # the page's answer in full (similarities, boxes): the same request again (a deterministic model)
                answer = server.post("/recognize", files={"image": (group.name, group.read_bytes(), "image/png")})
            finally:
                server.stop()
        finally:
            driver.quit()
    faces = sorted(answer["faces"], key=lambda f: (f["box"][0], f["box"][1]))  # the page's numbering
    names = [page_name(f) for f in faces]
    if names != shown:
        raise InputError(f"the page showed {shown} but the service answers {names} to the same photo")
    with atomic_write(args.out, "wb") as f:
        f.write(png)
    correct = set()
    for number, face in enumerate(faces, 1):
        x0, y0, x1, y1 = face["box"]
        cell = int((y0 + y1) / 2 // CELL) * columns + int((x0 + x1) / 2 // CELL)
        truth = people[cell].shown if cell < len(people) else "(no one)"
        if face["usable"]:
            ok = face["known"] and face["identity"] == truth
            correct.update([truth] if ok else [])
            if face["known"]:
                said = f"{face['identity']}, similarity {face['similarity']:.4f} ({'right' if ok else 'WRONG'})"
            else:  # below the threshold: the page shows the closest match too
                closest = (face.get("matches") or [{}])[0]
                said = (f"unknown (closest {closest.get('identity')}, similarity {face['similarity']:.4f}, below the "
                        f"threshold)")
            print(f"face {number}: {truth}: answered {said}")
        else:
            print(f"face {number}: {truth}: not usable ({page_name(face)})")
    print(f"named correctly: {len(correct)} of {len(people)} (threshold {answer['threshold']:.4f}); "
          f"screenshot {args.out}")
    return {"people": people, "faces": faces, "correct": len(correct), "threshold": answer["threshold"]}


if __name__ == "__main__":
    main()
