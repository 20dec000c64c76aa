"""Headless Debian chromium driven by Playwright (never `playwright install`), and a page
recorder: every console error, page error and request to another origin fails the test;
screenshots go to test-artifacts/browser/ (gitignored)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@dataclass
class Recorder:
    origin: str
    console_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)
    # Pages a test visits to see their error answer (e.g. the 404 of another project's
    # certificate): chromium logs that answer's status as a console error.
    expected_errors: set[str] = field(default_factory=set)

    def watch(self, page: Any) -> Any:
        def on_console(message: Any) -> None:
            if message.type != "error":
                return
            where = (message.location or {}).get("url", "")
            if message.text.startswith("Failed to load resource") and \
                    where in self.expected_errors:
                return
            self.console_errors.append(f"{page.url}: {message.text}")

        def on_request(request: Any) -> None:
            parts = urlsplit(request.url)
            if parts.scheme in ("data", "blob", "about"):
                return
            if f"{parts.scheme}://{parts.netloc}" != self.origin:
                self.foreign_requests.append(request.url)

        page.on("console", on_console)
        page.on("pageerror", lambda exc: self.console_errors.append(f"{page.url}: {exc}"))
        page.on("request", on_request)
        return page

    def check(self) -> None:
        assert self.console_errors == [], self.console_errors
        assert self.foreign_requests == [], self.foreign_requests


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        pytest.fail("Debian's chromium is not installed: run scripts/test (it installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Any, base: str, token: str) -> None:
    page.goto(f"{base}/dashboard/")
    assert "/dashboard/signin" in page.url  # not signed in yet: sent to sign in
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_url(f"{base}/dashboard/")
