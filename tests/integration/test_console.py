"""The console page in headless Chromium: log in, submit a job, watch it stream, see the pods.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` pip
package; Playwright never downloads a browser here (``executable_path`` is the system one).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.test_gateway_http import nats_gateway
from tests.unit.test_gateway_http import StartGateway

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("cleanup_streams"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent: apt-get install -y chromium"),
]


@pytest.fixture
def gateway(prefix: str, nats_url: str, pg_url: str, redis_url: str) -> StartGateway:
    """The one-pod gateway system on NATS with the real auth plugin."""
    return nats_gateway(prefix, nats_url, pg_url, redis_url)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    """A page in the system's headless Chromium (skips without the playwright package)."""
    pw_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (no browser download needed)")
    async with pw_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def test_console_login_submit_watch_and_pods(gateway: StartGateway, page: Any) -> None:
    async with gateway() as s:
        await page.goto(s.url + "/")
        assert await page.title() == "AIWFE console"
        # The pods table fills from GET /v1/pods (cluster_status).
        row = page.locator("#pods tr.pod").first
        await row.wait_for(timeout=10_000)
        assert "edge" in await row.inner_text() and "gateway" in await row.inner_text()
        assert await row.locator("td.ok").inner_text() == "ready"

        await page.fill("#username", "console_user")
        await page.fill("#password", "correct horse battery")
        await page.click("#register")
        await page.wait_for_function("document.getElementById('auth-status').textContent.startsWith('registered')")
        await page.click("#login")
        await page.wait_for_function("document.getElementById('ws-status').textContent === 'socket open'", timeout=10_000)

        await page.fill("#kind", "crunch")
        await page.fill("#input", '{"n": 6}')
        await page.click("#submit")
        result = page.locator("#events .frame-result")
        await result.wait_for(timeout=15_000)
        text = await result.inner_text()
        assert '"status":"done"' in text and '"square":36' in text
        assert await page.locator("#events .frame-accepted").count() == 1
        assert await page.locator("#events .frame-event").count() >= 1  # streamed before the result

        # Logging out revokes the token: the socket closes with 4001.
        await page.click("#logout")
        await page.wait_for_function("document.getElementById('ws-status').textContent.includes('4001')", timeout=10_000)
