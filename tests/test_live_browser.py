"""The live page in a real browser: headless Chromium (Debian's chromium + chromium-driver,
installed by ``bash setup_env.sh --dev``) driven by Selenium against ``inference.py --live`` on
configs/tiny.yaml. Frames are drawn, Next action and New scene land on the blocks the page
shows, Stop records a video whose sidecar agrees with the page.

``LIVE_SCREENSHOT=docs/live.png`` saves the page's screenshot there (README's picture)."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from utils.video import probe_video

REPO = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        raise RuntimeError("CI needs chromium and chromedriver: run `bash setup_env.sh --dev` (it installs "
                           "Debian's chromium and chromium-driver)")
    pytest.skip("chromium/chromedriver not installed (bash setup_env.sh --dev installs them)",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def live_server(tmp_path):
    proc = subprocess.Popen([sys.executable, "inference.py", "--live", "--config_path", "configs/tiny.yaml",
                             "--port", "0", "--output_folder", str(tmp_path / "out"), "--seed", "3"],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    url = None
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        url = next((line.split("open ")[1].split()[0] for line in list(lines) if "live: open " in line), None)
        time.sleep(0.1)
    assert url, "the server never printed its URL:\n" + "".join(lines)
    yield url, tmp_path / "out", proc, lines
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture
def browser(tmp_path):
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_steer_a_session_from_the_page(live_server, browser, tmp_path):
    url, out, proc, log = live_server
    wait = WebDriverWait(browser, 90, poll_frequency=0.1)
    browser.get(url)
    wait.until(lambda d: d.find_element(By.ID, "connection").text == "connected")
    assert "you steer" in browser.find_element(By.ID, "role").text

    def type_into(element_id, text):
        field = browser.find_element(By.ID, element_id)
        field.clear()
        field.send_keys(text)

    def canvas():
        return browser.execute_script("return document.getElementById('screen').toDataURL();")

    blank = canvas()
    type_into("action", "a red fox trots through a snowy forest")
    type_into("subtitle", "the fox")
    browser.find_element(By.ID, "start").click()
    seen = {blank}
    wait.until(lambda d: seen.add(canvas()) or len(seen) >= 3)  # frames are drawn, and they change

    def act(button, text, subtitle=""):
        type_into("action", text)
        type_into("subtitle", subtitle)
        rows = len(browser.find_elements(By.CSS_SELECTOR, "#actions tr"))
        browser.find_element(By.ID, button).click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#actions tr")) == rows + 1)
        row = browser.find_element(By.CSS_SELECTOR, "#actions tr:last-child")
        wait.until(lambda d: row.get_attribute("data-block") and row.get_attribute("data-delay"))
        assert row.get_attribute("data-kind") == {"next": "flush", "scene": "cut"}[button]
        return int(row.get_attribute("data-id")), int(row.get_attribute("data-block")), \
            float(row.get_attribute("data-delay"))

    next_id, next_block, next_delay = act("next", "the fox pounces into the snow")
    scene_id, scene_block, scene_delay = act("scene", "a quiet harbour at sunrise", "the harbour")
    assert 0 < next_block < scene_block
    assert 0 < next_delay < 10 and 0 < scene_delay < 10   # key press → first frame of its block, measured in the page
    for stat in ("stat-block", "stat-generated", "stat-speed", "stat-ahead"):
        assert browser.find_element(By.ID, stat).text not in ("", "–")

    shot = os.environ.get("LIVE_SCREENSHOT")
    browser.save_screenshot(str(REPO / shot if shot else tmp_path / "live.png"))

    browser.find_element(By.ID, "stop").click()
    transcript = wait.until(lambda d: d.find_element(By.ID, "transcript").text)
    rows = browser.find_elements(By.CSS_SELECTOR, "#actions tr")
    page_blocks = {int(r.get_attribute("data-id")): int(r.get_attribute("data-block")) for r in rows}
    assert page_blocks[next_id] == next_block and page_blocks[scene_id] == scene_block

    video = next(out.glob("*.mp4"))
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["complete"] and record["seed"] == 3 and record["prompt"] == transcript
    replay = shlex.split(browser.find_element(By.ID, "replay").text)  # the page's command, as a shell reads it
    assert replay == ["python", "inference.py", f"--replay={video.with_suffix('.json')}"], replay
    assert {a["id"]: a["block"] for a in record["live"]["actions"]} == page_blocks
    assert [a["kind"] for a in record["live"]["actions"]] == ["start", "flush", "cut"]
    assert [s["first_block"] for s in record["plan"]["segments"]] == [0, next_block, scene_block]
    assert probe_video(video)["frames"] == record["frames_written"] == record["plan"]["total_frames"]
    assert "Traceback" not in "".join(log)


@pytest.mark.slow
def test_the_page_keeps_the_typed_text_until_the_server_accepts_it(live_server, browser):
    """The fields are emptied (and, for a start, the player reset) when the server accepts the
    request, not when it is sent: text past live.max_text_chars (refused by the page itself), a
    refused start, an action typed on a watching page and a start sent while the previous video
    closes all keep what was typed."""
    url, out, proc, log = live_server
    wait = WebDriverWait(browser, 90, poll_frequency=0.05)
    browser.get(url)
    wait.until(lambda d: d.find_element(By.ID, "connection").text == "connected")

    def fill(action, subtitle="", seed="3"):
        browser.execute_script("for (const [id, v] of Object.entries(arguments[0])) "
                               "document.getElementById(id).value = v;",
                               {"action": action, "subtitle": subtitle, "seed": seed})

    def fields():
        return browser.execute_script("return [document.getElementById('action').value, "
                                      "document.getElementById('subtitle').value];")

    def message():
        return browser.find_element(By.ID, "message").text

    fill("x" * 4001, "too long")
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: "the action is 4001 characters long; the limit is 4000" in message())
    assert fields() == ["x" * 4001, "too long"]

    fill("a fox runs", "the fox", seed="-1")                      # the server refuses the seed
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: "seed" in message())
    assert fields() == ["a fox runs", "the fox"]

    fill("a fox runs", "the fox")
    browser.find_element(By.ID, "start").click()
    wait.until(lambda d: fields() == ["", ""])                     # started: the fields are emptied
    wait.until(lambda d: d.execute_script("return page.played") > 0)

    steering = browser.current_window_handle
    browser.switch_to.new_window("tab")                            # a second page only watches
    browser.get(url)
    wait.until(lambda d: "watching" in d.find_element(By.ID, "role").text)
    fill("from the watching page", "watcher")
    browser.find_element(By.ID, "action").send_keys(Keys.ENTER)
    wait.until(lambda d: "another page is steering" in message())
    assert fields() == ["from the watching page", "watcher"]
    browser.close()
    browser.switch_to.window(steering)

    fill("the fox jumps")
    browser.find_element(By.ID, "next").click()
    wait.until(lambda d: fields() == ["", ""])                     # queued: emptied
    played = browser.execute_script("return page.played")
    fill("a harbour", "harbour")                                   # Stop, then at once a start (Enter)
    browser.execute_script("document.getElementById('stop').click(); steer('start');")
    wait.until(lambda d: "still closing" in message())
    assert fields() == ["a harbour", "harbour"]
    assert browser.execute_script("return page.played") >= played  # the player was not reset
    wait.until(lambda d: d.find_element(By.ID, "transcript").text)  # stopped
    wait.until(lambda d: not d.find_element(By.ID, "start").get_attribute("disabled"))
    browser.find_element(By.ID, "start").click()                   # the kept text starts the next session
    wait.until(lambda d: fields() == ["", ""])
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: len(list(out.glob("*.json"))) == 2 and "stopped" in message())
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [r["prompt"].split("[")[0] for r in records] == ["a fox runs", "a harbour"]
    assert "Traceback" not in "".join(log)
