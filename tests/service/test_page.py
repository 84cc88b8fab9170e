"""The web page at / in a real headless browser (Chromium + chromedriver from Debian's packages, driven by
Selenium), against a real ``facesiam serve`` with a tiny random model that aligns faces with MTCNN: enrol people,
list, rename and delete them and their faces, verify two photos, search one, and name every face of a group photo.
Skipped cleanly when no browser is installed (README: ``apt-get install chromium chromium-driver``).

The "people" are the astronaut photo (skimage.data.astronaut(): Eileen Collins, NASA, public domain, via
tests.conftest.photo), its colour channels swapped, and its mirror image: three different aligned crops. A random
model gives every face a similarity near 1, but the same crop again (the same photo at the same scale, anywhere in
a bigger picture) is closer still (1 - sim ~ 1e-6 against ~ 1e-4 between the three), so with --threshold 0.99998 the
group photo's faces are named exactly and a deleted person's face comes back "unknown".
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import TOKEN, Server, upload

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (the dev extra)")
pytest.importorskip("facenet_pytorch", reason="the page test aligns faces with MTCNN (facenet-pytorch)")
pytest.importorskip("skimage", reason="the page test's photos come from scikit-image's sample data")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.skipif(not (BROWSER and DRIVER), reason="no Chromium + chromedriver: apt-get install "
                                 "chromium chromium-driver"),
              pytest.mark.timeout(150)]
WAIT = 30  # seconds for an answer to appear on the page
THRESHOLD = "0.99998"
ADA, BEA = "Ada", "Bea"
EVIL = "<img src=x onerror=alert(1)> Zoë"  # must be shown as text, never parsed as HTML


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)  # no driver download
    driver.set_page_load_timeout(WAIT)
    driver.set_script_timeout(WAIT)
    yield driver
    driver.quit()


def wait_until(driver, condition, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition, message)


def submit(driver, button_id: str, result_id: str):
    """Click a form's button and return its result element once the page has put an answer (or an error) in it."""
    from selenium.webdriver.common.by import By

    driver.execute_script("document.getElementById(arguments[0]).replaceChildren()", result_id)
    driver.find_element(By.ID, button_id).click()
    wait_until(driver, lambda d: d.execute_script(
        "const out = document.getElementById(arguments[0]);"
        "return out.childElementCount > 0 && !out.querySelector('.pending')", result_id), f"no answer in #{result_id}")
    return driver.find_element(By.ID, result_id)


def people_shown(driver) -> dict[str, str]:
    """{name: "N faces"} as listed on the page (read in one script: the list is rebuilt after every change)."""
    return dict(driver.execute_script(
        "return [...document.querySelectorAll('#people-list li.person')].map(li => "
        "[li.querySelector('.person-name').textContent, li.querySelector('.person-count').textContent])"))


def wait_for_people(driver, want: dict[str, str]) -> None:
    wait_until(driver, lambda d: people_shown(d) == want, f"the list never showed {want}")


def person_row(driver, name: str):
    from selenium.webdriver.common.by import By

    rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "#people-list li.person")
            if r.get_attribute("data-name") == name]
    assert len(rows) == 1, (name, people_shown(driver))
    return rows[0]


def accept_confirm(driver) -> None:
    from selenium.webdriver.support import expected_conditions as EC

    wait_until(driver, EC.alert_is_present(), "no confirmation asked")
    driver.switch_to.alert.accept()


def recognise(driver, group) -> list[str]:
    """Upload the group photo to "Who is in this photo?" and return the names next to the boxes, left to right,
    after checking that each box sits on its face of the displayed photo."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "recognize-image").send_keys(str(group))
    out = submit(driver, "recognize-button", "recognize-result")
    assert not out.find_elements(By.CSS_SELECTOR, ".error"), out.text
    wait_until(driver, lambda d: d.execute_script(
        "const p = document.getElementById('recognize-photo'); return p.complete && p.naturalWidth > 0"))
    assert driver.find_element(By.ID, "recognize-photo").get_attribute("src").startswith("blob:")
    boxes = driver.execute_script("""
        const photo = document.getElementById('recognize-photo').getBoundingClientRect();
        return [...document.querySelectorAll('#recognize-figure .face-box')].map(b => {
          const r = b.getBoundingClientRect();
          return {name: b.querySelector('.face-name').textContent, x: r.left - photo.left, y: r.top - photo.top,
                  w: r.width, scale: photo.width / document.getElementById('recognize-photo').naturalWidth};
        }).sort((a, b) => a.x - b.x);""")
    listed = [li.find_element(By.CSS_SELECTOR, ".face-name").text
              for li in driver.find_elements(By.CSS_SELECTOR, "#recognize-list li")]
    assert sorted(listed) == sorted(b["name"] for b in boxes)
    assert driver.find_element(By.ID, "recognize-summary").text.startswith(f"{len(boxes)} faces")
    for i, b in enumerate(boxes):  # face i of the group is in the i-th 400 px panel, its box ~70 px wide
        assert i * 400 < b["x"] / b["scale"] < (i + 1) * 400 - 100, b
        assert 40 < b["w"] / b["scale"] < 120 and 50 < b["y"] / b["scale"] < 200, b
    return [b["name"] for b in boxes]


def no_injected_markup(driver) -> bool:
    return driver.execute_script("return document.querySelectorAll('[onerror], img[src=\"x\"]').length") == 0


def test_the_page_enrols_recognises_and_manages_people(browser, aligned_model, tmp_path):
    from selenium.webdriver.common.by import By

    from tests.conftest import photo

    def save(image: Image.Image, name: str):
        path = tmp_path / name
        image.save(path)
        return path.resolve()

    ada = photo(0.8, 0, (60, 60))
    people = {ADA: ada, BEA: Image.fromarray(np.asarray(ada)[:, :, ::-1].copy()),
              EVIL: ada.transpose(Image.FLIP_LEFT_RIGHT)}
    files = {name: save(image, f"person{i}.png") for i, (name, image) in enumerate(people.items())}
    ada2 = save(photo(0.8, 0, (20, 90), (110, 110, 110)), "ada2.png")  # the same face elsewhere on the canvas
    group = Image.new("RGB", (1200, 400), (128, 128, 128))
    for i, image in enumerate(people.values()):
        group.paste(image, (400 * i, 0))
    group = save(group, "group.png")

    args = ["--checkpoint", str(aligned_model), "--gallery", str(tmp_path / "g"), "--threshold", THRESHOLD]
    with Server(args, log=tmp_path / "serve.log") as srv:
        browser.get(srv.url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "people-refresh").click()
        wait_until(browser, lambda d: d.find_element(By.ID, "people-summary").text == "0 people, 0 faces")
        assert browser.execute_script("return sessionStorage.getItem('facesiam-token')") == TOKEN

        # enrol three people from the page, Ada with two photos
        for name, paths in ((ADA, [files[ADA], ada2]), (BEA, [files[BEA]]), (EVIL, [files[EVIL]])):
            browser.find_element(By.ID, "enroll-name").send_keys(name)
            browser.find_element(By.ID, "enroll-images").send_keys("\n".join(str(p) for p in paths))
            out = submit(browser, "enroll-button", "enroll-result")
            assert out.find_elements(By.ID, "enroll-done"), out.text
            assert out.find_element(By.CSS_SELECTOR, ".enroll-identity").text == name
        want = {ADA: "2 faces", BEA: "1 face", EVIL: "1 face"}
        wait_for_people(browser, want)
        assert browser.find_element(By.ID, "people-summary").text == "3 people, 4 faces"
        assert no_injected_markup(browser)

        # verify and search, as the API answers
        for second in (ada2, files[BEA]):
            api = srv.client.post("/verify", files={"image1": upload(files[ADA]), "image2": upload(second)},
                                  headers=srv.auth).json()
            browser.find_element(By.ID, "image1").send_keys(str(files[ADA]))
            browser.find_element(By.ID, "image2").send_keys(str(second))
            submit(browser, "verify-button", "verify-result")
            decision = browser.find_element(By.ID, "decision")
            assert decision.text == ("SAME person" if api["same"] else "DIFFERENT people")
            assert decision.get_attribute("class") == api["decision"]
            assert float(browser.find_element(By.ID, "similarity").text) == pytest.approx(api["similarity"], abs=1e-4)
        found = srv.client.post("/search", files={"image": upload(files[BEA])}, headers=srv.auth).json()
        assert found["identity"] == BEA
        browser.find_element(By.ID, "image").send_keys(str(files[BEA]))
        submit(browser, "search-button", "search-result")
        assert browser.find_element(By.ID, "answer").text == BEA
        rows = browser.find_elements(By.CSS_SELECTOR, "#matches tr")[1:]
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [m["identity"] for m in found["matches"]]

        # who is in the group photo: one box per face, each named
        assert recognise(browser, group) == [ADA, BEA, EVIL]
        assert no_injected_markup(browser)

        # Ada's faces: two; delete one (the list of faces stays open and shrinks)
        person_row(browser, ADA).find_element(By.CSS_SELECTOR, ".person-faces").click()
        wait_until(browser, lambda d: len(person_row(d, ADA).find_elements(By.CSS_SELECTOR, "li.face")) == 2)
        person_row(browser, ADA).find_elements(By.CSS_SELECTOR, ".face-delete")[1].click()
        accept_confirm(browser)
        wait_for_people(browser, {**want, ADA: "1 face"})
        wait_until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#people-list li.face")) == 1)
        assert "Deleted face" in browser.find_element(By.ID, "people-result").text

        # rename Ada; a name that is taken is refused with the service's message (409)
        for new, ok in ((EVIL, False), ("Ada Lovelace", True)):
            row = person_row(browser, ADA)
            if not row.find_elements(By.CSS_SELECTOR, ".rename-form"):
                row.find_element(By.CSS_SELECTOR, ".person-rename").click()
            box = row.find_element(By.CSS_SELECTOR, ".rename-input")
            box.clear()
            box.send_keys(new)
            browser.execute_script("document.getElementById('people-result').replaceChildren()")
            row.find_element(By.CSS_SELECTOR, ".rename-save").click()
            wait_until(browser, lambda d: d.find_element(By.ID, "people-result").text)
            if not ok:
                assert "409" in browser.find_element(By.CSS_SELECTOR, "#people-result .error").text
        want = {"Ada Lovelace": "1 face", BEA: "1 face", EVIL: "1 face"}
        wait_for_people(browser, want)

        # delete Bea: gone from the list, and her face in the group photo is now unknown
        person_row(browser, BEA).find_element(By.CSS_SELECTOR, ".person-delete").click()
        accept_confirm(browser)
        del want[BEA]
        wait_for_people(browser, want)
        assert browser.find_element(By.ID, "people-summary").text == "2 people, 2 faces"
        assert recognise(browser, group) == ["Ada Lovelace", "unknown", EVIL]
        assert no_injected_markup(browser)

        # a wrong token: the service's message on the page, not a broken page
        box = browser.find_element(By.ID, "token")
        box.clear()
        box.send_keys("not-the-token-at-all")
        out = submit(browser, "verify-button", "verify-result")
        assert "token" in out.find_element(By.CSS_SELECTOR, ".error").text
        assert people_shown(browser) == want  # the list stays as it was
