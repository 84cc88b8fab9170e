"""The web page at / in a real headless browser (Chromium + chromedriver from Debian's packages, driven by
Selenium): upload two photos and read the decision; search a photo and read the matches. Skipped cleanly when no
browser is installed (README: `apt-get install chromium chromium-driver`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.service.conftest import Server, upload

webdriver = pytest.importorskip("selenium.webdriver", reason="the page test needs selenium (the dev extra)")
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="no Chromium + chromedriver: apt-get install "
                                "chromium chromium-driver")
WAIT = 60  # seconds for an answer to appear on the page


@pytest.fixture()
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)  # no driver download
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def answer(driver, element_id: str) -> str:
    """Text of #element_id once the page has replaced its '... ing' placeholder with an answer."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.ID, element_id))
    return driver.find_element(By.ID, element_id).text


def test_verify_and_search_from_the_page(browser, tiny_model_dir, face_folder, tmp_path):
    from selenium.webdriver.common.by import By

    people = {d.name: sorted(d.glob("*.png")) for d in sorted(face_folder.iterdir()) if d.is_dir()}
    names = list(people)
    a, b = people[names[0]][:2]
    c = people[names[1]][0]
    args = ["--checkpoint", str(tiny_model_dir), "--gallery", str(tmp_path / "g"), "--threshold", "0.9"]
    with Server(args, log=tmp_path / "serve.log") as srv:
        for n in names[:4]:
            r = srv.client.post("/enroll", data={"identity": n}, files=[("images", upload(p)) for p in people[n][1:]],
                                headers=srv.auth)
            assert r.status_code == 200, r.text
        api = {}
        for first, second in ((a, b), (a, c)):
            r = srv.client.post("/verify", files={"image1": upload(first), "image2": upload(second)}, headers=srv.auth)
            api[second] = r.json()
        probe = people[names[2]][0]
        found = srv.client.post("/search", files={"image": upload(probe)}, headers=srv.auth).json()

        browser.get(srv.url + "/")
        browser.find_element(By.ID, "token").send_keys(srv.auth["Authorization"].split()[1])
        for second in (b, c):
            browser.find_element(By.ID, "image1").send_keys(str(Path(a).resolve()))
            browser.find_element(By.ID, "image2").send_keys(str(Path(second).resolve()))
            browser.find_element(By.ID, "verify-button").click()
            decision = answer(browser, "decision")
            similarity = float(browser.find_element(By.ID, "similarity").text)
            assert similarity == pytest.approx(api[second]["similarity"], abs=1e-4)
            assert decision == ("SAME person" if api[second]["same"] else "DIFFERENT people")
            assert browser.find_element(By.ID, "decision").get_attribute("class") == api[second]["decision"]
            browser.execute_script("document.getElementById('verify-result').innerHTML = ''")

        browser.find_element(By.ID, "image").send_keys(str(Path(probe).resolve()))
        browser.find_element(By.ID, "search-button").click()
        shown = answer(browser, "answer")
        assert shown.startswith(found["identity"] if found["known"] else "unknown")
        rows = browser.find_elements(By.CSS_SELECTOR, "#matches tr")[1:]
        assert len(rows) == len(found["matches"]) == 4
        assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [m["identity"] for m in found["matches"]]

        # a wrong token is shown as the service's error, not a crash of the page
        box = browser.find_element(By.ID, "token")
        box.clear()
        box.send_keys("not-the-token-at-all")
        browser.execute_script("document.getElementById('verify-result').innerHTML = ''")
        browser.find_element(By.ID, "verify-button").click()
        assert answer(browser, "decision") == "error"
        assert "token" in browser.find_element(By.ID, "verify-result").text
