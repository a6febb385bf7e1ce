"""The web console in a real browser: headless Chromium from the Debian packages driven by
Selenium through the system chromedriver, with a fake microphone that plays a speech WAV.

One test walks the console as a person would (pull a model, pause and resume it and watch its
bar reach 100 %, transcribe a file and read its words, transcribe the microphone live and read
the final words); one runs it over HTTPS against services that want a token. Screenshots of the
whole page go to the test's tmp dir, or to $VOXSERVE_SCREENSHOTS/<test>/ when that is set
(for CI to keep; docs/console.png is one of them). Without chromium and chromium-driver (scripts/setup.sh
--test installs them) the tests skip, naming what is missing.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.http_gateway.conftest import GatewayHandle
from tests.hubserver import HubServer
from tests.support import DATA_DIR, TRANSCRIPTS, InferenceHandle, word_error_rate
from voxserve_common.auth import token_sha256

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="needs the Debian packages chromium and chromium-driver (scripts/setup.sh --test installs them)",
    ),
    # Several steps, each allowed WAIT: ~40 s on a 2-core machine at load 10, far more room here.
    pytest.mark.timeout(900),
]
WAIT = 180  # seconds for anything the services do (a model load on a loaded 2-core machine)
TOKEN = "console-token-0123456789"
# tiny.en on the looped speech_short.wav captured by Chromium at the AudioContext's rate
# (44.1 kHz here) and resampled by the inference service: a whole utterance has come out word
# for word; 0.25 lets two of its 8 words differ.
LIVE_WER_BOUND = 0.25


def microphone_wav(tmp_path: Path) -> Path:
    """speech_short.wav and 1.5 s of silence after it: the fake microphone loops the file,
    and the pause lets the engine end each utterance."""
    with wave.open(str(DATA_DIR / "speech_short.wav"), "rb") as source:
        params, frames = source.getparams(), source.readframes(source.getnframes())
    path = tmp_path / "microphone.wav"
    with wave.open(str(path), "wb") as target:
        target.setparams(params)
        target.writeframes(frames + b"\0" * (params.sampwidth * params.nchannels * int(params.framerate * 1.5)))
    return path


class Browser:
    def __init__(self, microphone: Path, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={microphone}",
        ):
            options.add_argument(arg)
        options.accept_insecure_certs = True  # the test CA's certificate, over HTTPS
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        self.shots = shots
        shots.mkdir(exist_ok=True)

    def wait(self, condition: Callable[[Any], Any], message: str, timeout: float = WAIT) -> Any:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        waiting = WebDriverWait(
            self.driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
        )
        return waiting.until(condition, message)

    def click(self, selector: str) -> None:
        """A real click on the element; found again if the page redrew it meanwhile."""
        self.wait(lambda _: self.css(selector).click() or True, f"click {selector}", timeout=60)

    def css(self, selector: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    # Read through the page's own DOM in one call: the catalog's rows are redrawn on every
    # event, and an element Selenium found a moment ago may be gone.
    def attr(self, selector: str, name: str) -> str | None:
        script = "const e = document.querySelector(arguments[0]); return e ? e.getAttribute(arguments[1]) : null"
        value = self.driver.execute_script(script, selector, name)
        return None if value is None else str(value)

    def text(self, selector: str) -> str:
        script = "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent).join(' ')"
        return str(self.driver.execute_script(script, selector))

    def shot(self, name: str) -> Path:
        """The whole page, not only the window, at 60 % (about 100-200 KB)."""
        width, height = self.driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
        )
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 0.6}
        picture = self.driver.execute_cdp_cmd(
            "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
        )
        path = self.shots / f"{name}.png"
        path.write_bytes(base64.b64decode(picture["data"]))
        return path

    def resources(self) -> list[str]:
        return list(self.driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"))

    def errors(self) -> list[str]:
        return [entry["message"] for entry in self.driver.get_log("browser") if entry["level"] == "SEVERE"]

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Browser]:
    kept = os.environ.get("VOXSERVE_SCREENSHOTS")
    shots = Path(kept) / request.node.name if kept else tmp_path / "screenshots"
    shots.parent.mkdir(parents=True, exist_ok=True)
    opened = Browser(microphone_wav(tmp_path), shots)
    yield opened
    opened.close()


# Every text a draft line showed, kept by the page itself: drafts are replaced by their final
# within moments, quicker than a test can poll.
RECORD_DRAFTS = """
window.draftsSeen = [];
new MutationObserver(() => {
  for (const line of document.querySelectorAll("#live-transcript .item.draft")) {
    if (line.textContent.trim()) window.draftsSeen.push(line.textContent);
  }
}).observe(document.getElementById("live-transcript"), {subtree: true, childList: true, characterData: true});
"""


def live_finals(browser: Browser, shot: str) -> list[str]:
    """Start the microphone (the looped speech_short.wav), wait for a final line that is the
    sentence within LIVE_WER_BOUND and for a draft shown before a final, take the screenshot
    ``shot``; stop. The final lines."""
    reference = TRANSCRIPTS["speech_short.wav"]
    browser.driver.execute_script(RECORD_DRAFTS)
    browser.click("#live-start")

    def finals() -> list[str]:
        script = "return [...document.querySelectorAll('#live-transcript .item.final')].map(e => e.textContent)"
        return list(browser.driver.execute_script(script))

    def sentence_heard(_: Any) -> bool:
        # An error on the page (a refused socket, an error event) ends the wait at once.
        assert browser.attr("#live-status", "class") != "error", browser.text("#live-status")
        return any(word_error_rate(reference, line) <= LIVE_WER_BOUND for line in finals())

    # The first utterance may miss its first words (the socket opens after the microphone
    # does); the file loops, so a later one is whole.
    browser.wait(sentence_heard, f"a final line within WER {LIVE_WER_BOUND} of {reference!r}")
    browser.wait(lambda _: browser.driver.execute_script("return window.draftsSeen.length") > 0, "a draft in grey")
    assert browser.attr("#live-status", "class") == "ok", browser.text("#live-status")  # no error event
    browser.shot(shot)
    browser.click("#live-stop")
    return finals()


def test_a_person_pulls_a_model_transcribes_a_file_and_the_microphone(
    browser: Browser, gateway: GatewayHandle, hub: HubServer
) -> None:
    hub.throttle(5 << 20, path="model.bin")  # 75 MB take at least 15 s: the bar is seen on its way
    browser.driver.get(gateway.base_url + "/")
    row = 'tr[data-model="test-tiny"]'
    browser.wait(lambda _: browser.attr(row, "data-state") == "NOT_DOWNLOADED", "the catalog")
    browser.click(f'{row} button[data-action="pull"]')

    def part_way(_: Any) -> bool:
        """The bar between 0 and 100 %, with bytes, speed and time left, e.g.
        "31 % · 23.5 MiB of 74.5 MiB · 10.0 MiB/s · 6 s left"."""
        now = browser.attr(f"{row} .bar", "aria-valuenow")
        text = browser.text(f"{row} .progress-text")
        moving = re.fullmatch(rf"{now} % · [\d.]+ \w+ of 74\.5 MiB · [\d.]+ \w+/s · .+ left", text) is not None
        return browser.attr(row, "data-state") == "DOWNLOADING" and now is not None and 0 < int(now) < 50 and moving

    browser.wait(part_way, "the bar part way, with bytes, speed and time left")
    browser.shot("1-pulling")
    browser.click(f'{row} button[data-action="pause"]')
    browser.wait(lambda _: browser.attr(row, "data-state") == "PAUSED", "the download paused")
    paused_at = int(browser.attr(f"{row} .bar", "aria-valuenow") or 0)
    assert 0 < paused_at < 100, "a paused download keeps its bytes and shows them"
    browser.click(f'{row} button[data-action="resume"]')
    browser.wait(lambda _: browser.attr(row, "data-state") == "READY", "the pull ends READY")
    hub.throttle(None)
    assert browser.attr(f"{row} .bar", "aria-valuenow") == "100"
    assert "100 %" in browser.text(f"{row} .progress-text")
    browser.shot("2-pulled")

    browser.css("#file").send_keys(str(DATA_DIR / "speech_multi.wav"))
    browser.click("#transcribe-start")
    browser.wait(lambda _: browser.attr("#file-status", "data-done") == "true", "the transcription")
    segments = browser.text("#segments .segment").lower()
    for words in ("weekly meeting", "budget", "see you next week"):
        assert words in segments
    assert len(browser.driver.find_elements("css selector", "#segments .segment")) >= 3  # one line a segment
    browser.wait(lambda _: "whisper-tiny.en" in browser.text("#loaded"), "the loaded model listed")
    browser.shot("3-file")

    finals = live_finals(browser, "4-live")
    assert finals and all(line.strip() for line in finals)  # an empty final is removed, not shown

    origin = gateway.base_url
    assert all(url.startswith(origin) for url in browser.resources()), "every asset comes from the gateway"
    assert browser.errors() == []


@pytest.fixture
def guarded(start_inference: Callable[..., InferenceHandle], tmp_path: Path) -> InferenceHandle:
    tokens = tmp_path / "tokens.yaml"
    entry = {"sha256": token_sha256(TOKEN), "roles": ["read", "transcribe"]}
    tokens.write_text(yaml.safe_dump({"tokens": {"console": entry}}))
    return start_inference(auth_tokens=tokens)


def test_the_console_over_https_asks_for_a_token_once_and_keeps_it(
    browser: Browser, guarded: InferenceHandle, start_gateway: Callable[..., GatewayHandle], tmp_path: Path
) -> None:
    issued = trustme.CA().issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    gateway = start_gateway(store=guarded.store, inference=guarded, tls_cert=cert, tls_key=key)
    assert gateway.base_url.startswith("https://")
    browser.driver.get(gateway.base_url + "/")
    browser.wait(lambda _: browser.attr("#token-dialog", "open") is not None, "the token dialog")
    browser.shot("1-token")
    browser.css("#token-input").send_keys(TOKEN)
    browser.click("#token-save")
    browser.wait(lambda _: "token set" in browser.text("#token-state"), "the token kept")
    browser.wait(
        lambda _: "nothing loaded" in browser.text("#loaded") or "whisper" in browser.text("#loaded"), "the cache"
    )

    # wss:, the token in OpenAI's browser subprotocol (an https page may not open ws:)
    live_finals(browser, "2-live")
    assert browser.attr("#token-dialog", "open") is None, "asked once only"

    browser.driver.refresh()  # the same tab: the token is still there, nothing is asked again
    browser.wait(lambda _: "whisper-tiny.en" in browser.text("#loaded"), "the cache with the token")
    assert browser.attr("#token-dialog", "open") is None
    assert "token set" in browser.text("#token-state")
