"""Screenshot of the ``captions serve`` page in headless Chromium (docs/serve-page.png).

Starts the server on a checkpoint, opens the page in Debian's Chromium driven by Selenium through
Debian's chromedriver (no browser download), uploads an image, hovers one word of the caption so
that its attention map lies over the photo, and saves the page:

    .venv/bin/captions demo --out /tmp/demo
    .venv/bin/python benchmarks/serve_screenshot.py --checkpoint /tmp/demo/run/best.pt \\
        --image /tmp/demo/prepared/images/<name>.jpg --word 2 --out docs/serve-page.png

``chromium_driver`` and ``upload_and_hover`` are also what tests/test_serve.py uses.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serve_load import start_server, stop_server  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def missing_browser() -> str | None:
    """Why the browser cannot be driven here (None when it can)."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is absent (Debian package chromium; scripts/setup.sh installs it where apt-get works)"
    if not CHROMEDRIVER.exists():
        return f"{CHROMEDRIVER} is absent (Debian package chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    return None


@contextmanager
def chromium_driver(width: int = 412, height: int = 915) -> Iterator:
    """Headless Chromium (phone-sized window by default) with a fresh profile, driven by Selenium
    through Debian's chromedriver; quit and the profile deleted on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="captions-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def upload_and_hover(driver, url: str, image: Path, word: int = 0, timeout: float = 30.0) -> dict:
    """Open the page at ``url``, choose ``image`` in its file input, wait for the caption, hover
    word ``word``; returns the caption's words, the overlay's state and the status line."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, timeout).until(lambda d: "decoder" in d.find_element(By.ID, "model").text)
    driver.find_element(By.ID, "file").send_keys(str(image))
    WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption .word")
                                         or d.find_element(By.ID, "status").text.startswith(image.name + ":"))
    words = driver.find_elements(By.CSS_SELECTOR, "#caption .word")
    state = {"words": [w.text for w in words], "status": driver.find_element(By.ID, "status").text}
    if words:
        ActionChains(driver).move_to_element(words[min(word, len(words) - 1)]).perform()
        overlay = driver.find_element(By.ID, "overlay")
        state.update(overlay_visible=overlay.is_displayed(), overlay_src=overlay.get_attribute("src") or "",
                     overlay_size=overlay.size,
                     active=[w.text for w in driver.find_elements(By.CSS_SELECTOR, "#caption .word.active")])
    return state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Screenshot of the captions serve page.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--word", type=int, default=0, help="index of the word to hover")
    p.add_argument("--out", type=Path, default=Path("docs/serve-page.png"))
    p.add_argument("--width", type=int, default=412)
    p.add_argument("--height", type=int, default=915)
    args = p.parse_args(argv)
    if why := missing_browser():
        p.error(why)
    proc, url = start_server(args.checkpoint)
    try:
        with chromium_driver(args.width, args.height) as driver:
            state = upload_and_hover(driver, url, args.image.resolve(), args.word)
            driver.save_screenshot(str(args.out))
    finally:
        stop_server(proc)
    print(state["words"], "hovered:", state.get("active"), "->", args.out)


if __name__ == "__main__":
    main()
