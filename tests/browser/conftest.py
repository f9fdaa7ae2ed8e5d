"""dash_duo in Debian's headless chromium (never a downloaded browser)."""

import shutil
import tempfile

import pytest


def pytest_setup_options():
    from selenium.webdriver.chrome.options import Options

    o = Options()
    o.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
              "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--window-size=1400,1000", f"--user-data-dir={tempfile.mkdtemp(prefix='chr-')}"]:
        o.add_argument(a)
    return o


def pytest_collection_modifyitems(config, items):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        skip = pytest.mark.skip(reason="Debian chromium + chromium-driver not installed")
        for item in items:
            item.add_marker(skip)
