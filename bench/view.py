"""The live web view in a real browser: headless Chromium (Debian's chromium and chromium-driver)
driven by Selenium opens the sink's page during a synthetic line of two streams, waits until it
has updated itself, and saves a screenshot.

    apt-get install chromium chromium-driver && python -m bench.view      -> docs/view.png
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")


def missing() -> str | None:
    """Why a browser cannot be driven here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in CHROMIUM:
        if not Path(path).is_file():
            return f"{path} not found (apt-get install chromium chromium-driver)"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 1000):
    """A headless Chromium WebDriver on Debian's binaries (no driver download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(CHROMIUM[1]), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 60.0, every: float = 0.2):
    """predicate()'s first truthy value within `timeout` seconds; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def page_counts(driver, stream: str) -> dict[str, int] | None:
    """The counts the page shows for `stream` (None before it shows the stream)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        card = driver.find_element(By.ID, f"stream-{stream}")
        return {k: int(card.find_element(By.CLASS_NAME, cls).text)
                for k, cls in (("results", "results"), ("ok", "ok"), ("defect", "defects"), ("error", "errors"),
                               ("lost", "lost"))}
    except (NoSuchElementException, StaleElementReferenceException, ValueError):
        return None


def latest_image(driver, stream: str) -> str | None:
    """The src of the latest-defect image the page shows for `stream` (None while it shows none, or
    when the page re-rendered between finding the image and reading it)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return driver.find_element(By.CSS_SELECTOR, f"#stream-{stream} img").get_attribute("src")
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def screenshot(out: Path, frames: int = 1500) -> Path:
    """Run a synthetic line of two streams with the view and save a screenshot of the page mid-run."""
    from calibration.synthetic import make_dataset
    from pipeline.cli import main as lineguard
    from pipeline.linefile import load_line
    from pipeline.run import run_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "data", n_train=16, n_good=1, n_defect=1, size=256)
        if lineguard(["fit", str(data), "-o", str(tmp / "model")]) != 0:
            raise SystemExit("fit failed")
        port = free_port()
        (tmp / "line.toml").write_text(f'out = "out"\nview_port = {port}\n[products.weave]\nmodel = "model"\n'
                                       f'[[streams]]\nname = "cam0"\nsource = "synthetic"\nproduct = "weave"\n'
                                       f'frames = {frames}\n[[streams]]\nname = "cam1"\nsource = "synthetic"\n'
                                       f'product = "weave"\nframes = {frames}\n')
        run = threading.Thread(target=run_pipeline, args=(load_line(tmp / "line.toml"),), daemon=True)
        run.start()
        with chromium() as driver:
            wait_for(lambda: listening(port), timeout=120)
            driver.get(f"http://127.0.0.1:{port}/")
            wait_for(lambda: (page_counts(driver, "cam1") or {}).get("defect", 0) >= 3, timeout=120)
            time.sleep(1.0)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        run.join(timeout=600)
    return out


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "view.png")
    args = parser.parse_args()
    why = missing()
    if why:
        raise SystemExit(f"bench.view: {why}")
    print(f"wrote {screenshot(args.out)}")


if __name__ == "__main__":
    main()
