"""The console page in headless Chromium, step by step, on real NATS, PostgreSQL and Redis:
log in, pick a kind and see its example input, get inline errors, watch a helios job fill
its expert cards and stream its synthesis, reload mid-job and go on without duplicates,
reopen the job from the history, open a job by its id, replay a dead letter as an admin,
read the pods table.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and the ``playwright`` pip
package; Playwright never downloads a browser here (``executable_path`` is the system one).
Every step takes its screenshot; they go to ``docs/console-*.png`` (the README's "Console"
section) when ``AIWFE_SCREENSHOTS=docs`` is set, else to the test's temporary directory, so
that running the suite does not rewrite files git tracks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiwfe.bus.nats import NatsBus
from aiwfe.plugins.gateway.console_api import HISTORY_MAX, JobHistory
from tests.support.gateway import PROBE, GatewaySystem, real_auth_config, run_system
from tests.unit.test_gateway_http import PASSWORD, bearer, login

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
DOCS = Path(__file__).resolve().parents[2] / "docs"
ADMIN = "console_admin"
MEMORIES = [
    "The orders database uses a B-tree index on customer_id for fast lookups.",
    "Security review: tokens must expire after fifteen minutes.",
    "The cafeteria serves soup on Fridays.",
]
WAIT_MS = 30_000

pytestmark = [
    pytest.mark.integration,
    pytest.mark.usefixtures("cleanup_streams"),
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} absent: apt-get install -y chromium"),
]

MANIFEST = """
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 2
[pods.edge]
plugins = ["gateway", "auth", "{probe}", "perception", "reasoning", "memory", "learning", "helios"]
[plugins.gateway]
port = 0
job_kinds = {{ helios = "helios.ask", crunch = "probe.crunch" }}
[plugins.auth]
{auth}
admin_users = ["{admin}"]
[plugins.perception]
embedder = "auto"
embed_model_dir = "{nomodel}"
[plugins.reasoning]
latency_s = {latency_s}
[plugins.memory]
database_url = "{db}"
data_dir = "{data}"
collection = "{prefix}"
[plugins.learning]
database_url = "{db}"
[plugins.helios]
database_url = "{db}"
redis_url = "{redis}"
cache_prefix = "{prefix}:"
"""


@contextlib.asynccontextmanager
async def console_system(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, data: Path, latency_s: float = 2.0
) -> AsyncIterator[GatewaySystem]:
    """One pod with the gateway, the real auth (``console_admin`` an admin), helios and its
    collaborators, and the probe's ``crunch`` jobs; reasoning answers after ``latency_s``.
    Perception is told to use a semantic model from an empty directory: it falls back to
    hashing (as with the default) and says so, a degraded note of the pod."""
    (data / "no-model").mkdir(exist_ok=True)
    text = MANIFEST.format(
        prefix=prefix,
        probe=PROBE,
        auth=real_auth_config(pg_url, redis_url, prefix),
        admin=ADMIN,
        latency_s=latency_s,
        db=pg_url,
        redis=redis_url,
        data=data,
        nomodel=data / "no-model",
    )
    async with run_system(text, NatsBus(nats_url, prefix, name="edge")) as s:
        yield s


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    """A page in the system's headless Chromium (skips without the playwright package)."""
    pw_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (no browser download needed)")
    async with pw_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            ctx = await browser.new_context(viewport={"width": 1200, "height": 900})
            p = await ctx.new_page()
            p.on("pageerror", lambda e: print("page error:", e))
            yield p
        finally:
            await browser.close()


async def text_of(page: Any, selector: str) -> str:
    return str(await page.locator(selector).inner_text())


async def wait_text(page: Any, selector: str, needle: str, timeout_ms: int = WAIT_MS) -> None:
    """Wait until the element's text contains ``needle``."""
    await page.wait_for_function(
        "([s, n]) => { const e = document.querySelector(s); return !!e && e.textContent.includes(n); }",
        arg=[selector, needle],
        timeout=timeout_ms,
    )


async def log_in(page: Any, username: str) -> None:
    await page.fill("#username", username)
    await page.fill("#password", PASSWORD)
    await page.click("#register")
    await wait_text(page, "#auth-status", "registered")
    await page.click("#login")
    await wait_text(page, "#auth-status", f"logged in as {username}")
    await wait_text(page, "#ws-status", "socket open")


def shots_dir(tmp_path: Path) -> Path:
    """``docs/`` when ``AIWFE_SCREENSHOTS=docs`` (regenerating the README's pictures), else ``tmp_path``."""
    out = DOCS if os.environ.get("AIWFE_SCREENSHOTS") == "docs" else tmp_path / "screenshots"
    out.mkdir(exist_ok=True)
    return out


async def shot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"console-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0


@pytest.mark.timeout(240)  # a browser, a helios job with reasoning latency and a reload, on a shared machine
async def test_console_end_to_end(prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path, page: Any) -> None:
    shots = shots_dir(tmp_path)
    async with console_system(prefix, nats_url, pg_url, redis_url, tmp_path) as s:
        await page.goto(s.url + "/")
        assert await page.title() == "AIWFE console"

        # Pods: one replica of edge, ready, its plugins; and the live figures.
        row = page.locator('#pods tr.pod[data-pod="edge"]')
        await row.wait_for(timeout=WAIT_MS)
        assert await row.locator("td.replicas").inner_text() == "1"
        assert await row.locator("td.ready.ok").inner_text() == "ready"
        assert "helios" in await row.inner_text() and "gateway" in await row.inner_text()
        notes = await row.locator("td.notes").inner_text()  # a degraded plugin keeps the pod ready, noted
        assert notes.startswith("degraded: perception: embedder hashing (semantic unavailable:"), notes
        assert "open sockets" in await text_of(page, "#figures")

        # Log in; the user has memories for the experts to answer from.
        await log_in(page, "console_user")
        async with httpx.AsyncClient(base_url=s.url) as c:
            h = bearer(await login(c, "console_user"))
            for text in MEMORIES:
                assert (await c.post("/v1/memory", json={"text": text}, headers=h)).status_code == 201
        assert await page.locator("#dlq-panel").is_hidden()  # not an admin

        # Kind picker: the example input comes from the contract's JSON Schema (AsyncAPI).
        await wait_text(page, "#schema-help", "fields:")
        options = await page.locator("#kind option").all_inner_texts()
        assert sorted(options) == ["crunch", "helios"]
        await page.select_option("#kind", "helios")
        await wait_text(page, "#schema-help", "required: text")
        example = json.loads(await page.input_value("#input"))
        assert isinstance(example["text"], str) and example["text"] and "owner" not in example and "type" not in example
        assert example["max_experts"] == 4  # the contract's default
        await shot(page, shots, "submit")

        # Invalid input: a JSON parse error in the page, then the gateway's 400 next to the editor.
        await page.fill("#input", '{"text": "oops",')
        await page.click("#submit")
        await wait_text(page, "#input-error", "not JSON")
        assert await page.get_attribute("#input", "aria-invalid") == "true"
        await page.fill("#input", '{"text": 5}')
        await page.click("#submit")
        await wait_text(page, "#input-error", "field text: the gateway refused it (400)")
        await page.fill("#input", '{"max_experts": 2}')
        await page.click("#submit")
        await wait_text(page, "#input-error", "field text: the gateway refused it (400)")
        assert "missing required field" in await text_of(page, "#input-error")
        await shot(page, shots, "invalid")

        # A helios job: expert cards fill; reload while the experts still think.
        ask = {"text": "Which database index speeds up customer lookups?", "max_experts": 3, "use_cache": False}
        async with httpx.AsyncClient(base_url=s.url) as c:  # done so far in this process's registry (other tests' jobs too)
            done_before = (await c.get("/v1/console/figures")).json()["jobs"].get("done", 0)
        await page.fill("#input", json.dumps(ask))
        await page.click("#submit")
        await page.locator("#experts .card.expert").first.wait_for(timeout=WAIT_MS)
        await page.wait_for_function("document.querySelectorAll('#events li').length >= 3", timeout=WAIT_MS)
        job_id = await text_of(page, "#job-id")
        before = json.loads(await page.evaluate("sessionStorage.getItem('aiwfe.follow')"))
        assert job_id in before, "the running job is followed"
        assert await text_of(page, "#job-status") != "done", "reasoning latency keeps the job running here"
        rows_before = await page.locator("#events li").count()

        await page.reload()
        # Still logged in, the job redrawn from the tab's storage, then resumed after its last sequence.
        await wait_text(page, "#auth-status", "logged in as console_user")
        await wait_text(page, "#ws-status", "socket open")
        assert await text_of(page, "#job-id") == job_id
        assert await page.locator("#events li").count() >= rows_before
        await wait_text(page, "#job-status", "done")
        stats = await page.evaluate("window.aiwfeConsole")
        resumed = [r for r in stats["resumed"] if r["job_id"] == job_id]
        assert resumed and resumed[0]["after_seq"] > 0, stats
        assert stats["duplicates"] == 0, stats
        assert all(f["seq"] > resumed[0]["after_seq"] for f in stats["frames"] if f["job_id"] == job_id), stats
        seqs = [int(x) for x in await page.locator("#events li").evaluate_all("els => els.map(e => e.dataset.seq)")]
        assert seqs == sorted(set(seqs)), "every event once, in order"

        # Expert cards: status, confidence, latency and the streamed text; the synthesis as text.
        assert await page.locator("#helios-view").is_visible()
        cards = page.locator("#experts .card.expert")
        assert await cards.count() >= 1 and await cards.first.is_visible()
        for i in range(await cards.count()):
            c = cards.nth(i)
            assert await c.get_attribute("data-status") == "answered"
            meta = await c.locator(".meta").inner_text()
            assert "confidence" in meta and " ms" in meta
            assert (await c.locator(".text").inner_text()).strip()
        await wait_text(page, "#synthesis-meta", "confidence")
        synthesis = (await text_of(page, "#synthesis")).strip()
        assert "B-tree index on customer_id" in synthesis and not synthesis.startswith("{")
        assert await page.locator("#cancel").is_hidden()  # nothing left to cancel
        await page.click("#refresh")  # the live figures: this socket, the job just done
        await wait_text(page, '#figures [data-figure="ws_connections"] b', "1")
        await page.wait_for_function(  # this job counted (the figure contained "1" only by chance of the count)
            "([s, n]) => { const e = document.querySelector(s); return !!e && Number(e.textContent) > n; }",
            arg=['#figures [data-figure="jobs_done"] b', done_before],
            timeout=WAIT_MS,
        )
        await shot(page, shots, "helios")

        # History: the job with its status; reopening it replays its events from the start.
        hist = page.locator(f'#history tr.history-row[data-job="{job_id}"]')
        await hist.wait_for(timeout=WAIT_MS)
        await wait_text(page, f'#history tr.history-row[data-job="{job_id}"]', "done")
        n_events = len(seqs)
        await page.fill("#input", json.dumps({"text": "What does the cafeteria serve?", "max_experts": 1}))
        await page.click("#submit")
        await page.wait_for_function("j => document.getElementById('job-id').textContent !== j", arg=job_id, timeout=WAIT_MS)
        await wait_text(page, "#job-status", "done")
        await hist.locator("button.open").click()
        await wait_text(page, "#job-id", job_id)
        await wait_text(page, "#job-status", "done")
        await page.wait_for_function(f"document.querySelectorAll('#events li').length === {n_events}", timeout=WAIT_MS)
        assert (await text_of(page, "#synthesis")).strip() == synthesis
        order = await page.locator("#history tr.history-row").evaluate_all("els => els.map(e => e.dataset.job)")
        assert len(order) == 2 and order[1] == job_id, "newest first; reopening does not reorder"
        await shot(page, shots, "history")

        # Open by id: a job of this user submitted elsewhere opens (its kind from its record);
        # someone else's is refused by the server (404), named next to the field.
        async with httpx.AsyncClient(base_url=s.url) as c:
            mine = (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 4}}, headers=h)).json()["job_id"]
            other = bearer(await login(c, "console_other"))
            theirs = (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 5}}, headers=other)).json()["job_id"]
            for _ in range(100):
                if (await c.get(f"/v1/jobs/{mine}", headers=h)).json()["status"] == "done":
                    break
                await asyncio.sleep(0.1)
        await page.fill("#open-id", theirs)
        await page.click("#open-job")
        await wait_text(page, "#open-error", f"no job {theirs} of yours")
        assert await text_of(page, "#job-id") == job_id
        await page.fill("#open-id", mine)
        await page.click("#open-job")
        await wait_text(page, "#job-id", mine)
        await wait_text(page, "#job-kind", "crunch")
        await wait_text(page, "#job-status", "done")
        await wait_text(page, "#result-view", "square: 16")
        assert await text_of(page, "#open-error") == ""
        await page.locator(f'#history tr.history-row[data-job="{mine}"]').wait_for(timeout=WAIT_MS)

        # Cancelling a running helios job: its experts end with it.
        await page.fill("#input", json.dumps({"text": "What must tokens do?", "max_experts": 2, "use_cache": False}))
        await page.click("#submit")
        await page.wait_for_function("j => document.getElementById('job-id').textContent !== j", arg=job_id, timeout=WAIT_MS)
        await page.locator("#experts .card.expert").first.wait_for(timeout=WAIT_MS)
        await page.click("#cancel")
        await wait_text(page, "#job-status", "cancelled")
        statuses = await page.locator("#experts .card.expert").evaluate_all("els => els.map(e => e.dataset.status)")
        assert statuses and set(statuses) <= {"cancelled", "answered"}, statuses
        assert await page.locator("#cancel").is_hidden()

        # A job that dead-letters (the probe fails every attempt), shown as readable rows.
        await page.select_option("#kind", "crunch")
        await wait_text(page, "#kind-address", "probe.crunch")
        await page.fill("#input", '{"n": 3, "fail_times": 9}')
        await page.click("#submit")
        await wait_text(page, "#job-kind", "crunch")
        await wait_text(page, "#job-status", "failed", timeout_ms=60_000)
        dead_job = await text_of(page, "#job-id")
        assert "Flaky" in await text_of(page, "#events")

        # The dead-letter routes are admins' only, checked by the server.
        async with httpx.AsyncClient(base_url=s.url) as c:
            user = bearer(await login(c, "console_user"))
            assert (await c.get("/v1/admin/dead-letters", headers=user)).status_code == 403
            assert (await c.post(f"/v1/admin/dead-letters/{dead_job}/replay", headers=user)).status_code == 403
            assert (await c.get("/v1/admin/dead-letters")).status_code == 401
            assert (await c.get("/v1/console/jobs", headers=user)).status_code == 200
            r = await c.post("/v1/console/jobs", json={"job_id": "x" * 129, "kind": "crunch"}, headers=user)
            assert r.status_code == 400

        # An admin sees the dead letter with its reason and replays it.
        await page.click("#logout")
        await wait_text(page, "#auth-status", "logged out")
        assert await page.locator("#job-panel").is_hidden() and await page.locator("#history tr").count() == 0
        assert await page.evaluate("sessionStorage.getItem('aiwfe.token')") is None
        await log_in(page, ADMIN)
        assert await page.locator("#dlq-panel").is_visible()
        dl = page.locator(f'#dlq tr.dlq-row[data-job="{dead_job}"]')
        await dl.wait_for(timeout=WAIT_MS)
        assert "Flaky" in await dl.locator("td.reason").inner_text()
        assert '"n":3' in await dl.locator("td.preview").inner_text()
        await shot(page, shots, "admin")
        await dl.locator("button.replay").click()
        await wait_text(page, "#dlq-status", f"replayed {dead_job}")
        await page.click("#refresh")
        await wait_text(page, '#figures [data-figure="dead_letters"] b', "1")
        await page.locator("#cluster").screenshot(path=str(shots / "console-pods.png"))

        # Experts slower than their budget end "timed out", those the token budget cannot cover
        # "skipped" (neither is retried); with no answer the job fails.
        await page.select_option("#kind", "helios")
        await wait_text(page, "#kind-address", "helios.ask")
        for extra, status, meta in [
            ({"expert_timeout_s": 0.3}, "timed out", "no answer within 0.3 s"),
            ({"token_budget": 1}, "skipped", "token budget: 1 of 1 left"),
        ]:
            before_id = await text_of(page, "#job-id")
            ask = {"text": "Which database index speeds up customer lookups?", "max_experts": 2, "use_cache": False}
            await page.fill("#input", json.dumps({**ask, **extra}))
            await page.click("#submit")
            changed = "j => document.getElementById('job-id').textContent !== j"
            await page.wait_for_function(changed, arg=before_id, timeout=WAIT_MS)
            await wait_text(page, "#job-status", "failed")
            cards = page.locator("#experts .card.expert")
            assert await cards.count() == 2
            assert await cards.evaluate_all("els => els.map(e => e.dataset.status)") == [status, status]
            assert meta in await cards.first.locator(".meta").inner_text()
            assert (await text_of(page, "#synthesis-meta")).startswith("failed: no expert answered")


async def test_console_routes_validate_and_check_the_caller(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with console_system(prefix, nats_url, pg_url, redis_url, tmp_path, latency_s=0.0) as s:
        async with httpx.AsyncClient(base_url=s.url) as c:
            alice, bob = bearer(await login(c, "alice")), bearer(await login(c, "bob"))
            admin = bearer(await login(c, ADMIN))
            # Every console route but the kinds, the figures and the page's files needs a token.
            for method, path in [("GET", "/v1/console/me"), ("GET", "/v1/console/jobs"), ("POST", "/v1/console/jobs")]:
                assert (await c.request(method, path, json={})).status_code == 401, path
            assert (await c.get("/v1/console/kinds")).json()["kinds"] == [
                {"kind": "crunch", "address": "probe.crunch"},
                {"kind": "helios", "address": "helios.ask"},
            ]
            assert (await c.get("/v1/console/figures")).json()["ws_connections"] == 0
            assert (await c.get("/v1/console/me", headers=alice)).json() == {"username": "alice", "admin": False}
            assert (await c.get("/v1/console/me", headers=admin)).json() == {"username": ADMIN, "admin": True}

            # Only the page's own files are served.
            assert (await c.get("/console/console.js")).headers["content-type"].startswith("text/javascript")
            for name in ("index.html", "..%2Fapp.py", "nope.js"):
                assert (await c.get(f"/console/{name}")).status_code == 404, name

            # History: only one's own jobs, bounded fields, known kinds; newest first, each once.
            jobs = [
                (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": n}}, headers=alice)).json()["job_id"]
                for n in (2, 3)
            ]
            for job_id in [*jobs, jobs[0]]:
                r = await c.post("/v1/console/jobs", json={"job_id": job_id, "kind": "crunch"}, headers=alice)
                assert r.status_code == 201, r.text
            assert (await c.post("/v1/console/jobs", json={"job_id": jobs[0], "kind": "crunch"}, headers=bob)).status_code == 404
            for body in (
                {"job_id": jobs[1], "kind": "nope"},
                {"job_id": "a.b", "kind": "crunch"},
                {"job_id": "x" * 129, "kind": "crunch"},
                {"job_id": jobs[1], "kind": "crunch", "extra": 1},
                {"job_id": jobs[1]},
            ):
                assert (await c.post("/v1/console/jobs", json=body, headers=alice)).status_code == 400, body
            for _ in range(50):
                rows = (await c.get("/v1/console/jobs", headers=alice)).json()
                if all(r["status"] == "done" for r in rows):
                    break
                await asyncio.sleep(0.1)
            assert [r["job_id"] for r in rows] == [jobs[1], jobs[0]]  # newest first, each once
            assert [r["status"] for r in rows] == ["done", "done"] and rows[0]["finished_at"] > 0
            assert (await c.get("/v1/console/jobs", headers=bob)).json() == []
            # One job by id: the caller's only (404 otherwise, also for a malformed id); listed or not.
            one = (await c.get(f"/v1/console/jobs/{jobs[0]}", headers=alice)).json()
            assert (one["job_id"], one["kind"], one["status"]) == (jobs[0], "crunch", "done") and one["submitted_at"] > 0
            for who, path in [(bob, jobs[0]), (alice, "a.b"), (alice, "nope")]:
                assert (await c.get(f"/v1/console/jobs/{path}", headers=who)).status_code == 404, path
            assert (await c.get(f"/v1/console/jobs/{jobs[0]}")).status_code == 401
            unlisted = (await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 7}}, headers=bob)).json()["job_id"]
            for _ in range(100):
                one = (await c.get(f"/v1/console/jobs/{unlisted}", headers=bob)).json()
                if one["status"] != "pending":
                    break
                await asyncio.sleep(0.1)
            assert (one["kind"], one["status"], one["submitted_at"]) == ("crunch", "done", 0.0)  # the kind from its record
            history = JobHistory(s.gateway.handles.kernel)
            for i in range(HISTORY_MAX + 5):
                await history.add("carol", f"job{i}", "crunch")
            kept = [e[0] for e in await history.entries("carol")]
            assert kept == [f"job{i}" for i in range(HISTORY_MAX + 4, 4, -1)]  # bounded: the oldest dropped

            # Dead letters: admins only (checked by the server), kind validated, unknown ids 404.
            failing = (
                await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1, "fail_times": 9}}, headers=alice)
            ).json()
            for _ in range(100):
                letters = (await c.get("/v1/admin/dead-letters", headers=admin)).json()
                if letters:
                    break
                await asyncio.sleep(0.1)
            assert [d["job_id"] for d in letters] == [failing["job_id"]]
            assert letters[0]["kind"] == "probe.crunch" and letters[0]["attempts"] == 3
            assert letters[0]["reason"]["type"] == "Flaky" and '"fail_times":9' in letters[0]["input_preview"]
            assert (await c.get("/v1/admin/dead-letters?kind=probe.crunch", headers=admin)).json() == letters
            assert (await c.get("/v1/admin/dead-letters?kind=helios.ask", headers=admin)).json() == []
            for bad in ("probe.>", "a..b", "*", "x" * 300):
                assert (await c.get("/v1/admin/dead-letters", params={"kind": bad}, headers=admin)).status_code == 400, bad
            assert (await c.get("/v1/admin/dead-letters", headers=alice)).status_code == 403
            assert (await c.post("/v1/admin/dead-letters/nope/replay", headers=admin)).status_code == 404
            assert (await c.post("/v1/admin/dead-letters/a.b/replay", headers=admin)).status_code == 404
            r = await c.post(f"/v1/admin/dead-letters/{failing['job_id']}/replay", headers=alice)
            assert r.status_code == 403
            r = await c.post(f"/v1/admin/dead-letters/{failing['job_id']}/replay", headers=admin)
            assert r.status_code == 200 and r.json() == {"replayed": [failing["job_id"]]}


async def test_admin_routes_ask_auth_who_the_caller_is_on_every_call(
    prefix: str, nats_url: str, pg_url: str, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auth.whoami`` decides: a non-admin gets 403, an admin 200, and an admin disabled since
    its last call 401 (its token cut off) or, when only its row says so, 403."""
    monkeypatch.setenv("AIWFE_ADMIN_USERS", "second_admin,third_admin")
    async with console_system(prefix, nats_url, pg_url, redis_url, tmp_path, latency_s=0.0) as s:
        async with httpx.AsyncClient(base_url=s.url) as c:
            alice, admin = bearer(await login(c, "alice")), bearer(await login(c, ADMIN))
            second, third = bearer(await login(c, "second_admin")), bearer(await login(c, "third_admin"))
            for h in (admin, second, third):
                assert (await c.get("/v1/admin/dead-letters", headers=h)).status_code == 200
                assert (await c.get("/v1/console/me", headers=h)).json()["admin"] is True
            assert (await c.get("/v1/admin/dead-letters", headers=alice)).status_code == 403
            assert (await c.post("/v1/admin/users/alice/disable", headers=alice)).status_code == 403
            assert (await c.get("/v1/console/me", headers=bearer("x"))).status_code == 401

            # Disabled by another admin: the token is refused at once (nothing cached in the gateway).
            assert (await c.post("/v1/admin/users/second_admin/disable", headers=admin)).status_code == 200
            for r in (
                await c.get("/v1/admin/dead-letters", headers=second),
                await c.post("/v1/admin/dead-letters/x/replay", headers=second),
                await c.post("/v1/admin/users/alice/disable", headers=second),
                await c.get("/v1/console/me", headers=second),
            ):
                assert r.status_code == 401, r.text

            # Disabled in the database only (as if this pod had missed the cut-off): no admin rights.
            await s.plugin("auth").store.set_disabled("third_admin", True)
            assert (await c.get("/v1/admin/dead-letters", headers=third)).status_code == 403
            assert (await c.post("/v1/admin/users/alice/disable", headers=third)).status_code == 403
            assert (await c.get("/v1/console/me", headers=third)).json() == {"username": "third_admin", "admin": False}


SECURED = """
[system]
subject_prefix = "{prefix}"
drain_timeout_s = 2
[pods.edge]
plugins = ["gateway"]
[pods.auth]
plugins = ["auth"]
[pods.work]
plugins = ["{probe}"]
[plugins.gateway]
port = 0
job_kinds = {{ crunch = "probe.crunch" }}
[plugins.auth]
{auth}
admin_users = ["{admin}"]
"""


async def test_the_console_routes_work_with_the_gateway_pods_least_privilege_nats_user(
    prefix: str, pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    """On a nats-server with the users of ``aiwfe.kernel.tools.natsauth``, the gateway's pod
    (its own user) asks the auth pod who the caller is (``auth.whoami``), reads and replays
    dead letters of a job another pod consumes and keeps the history in the bucket, and no
    pod user hits its permissions."""
    from aiwfe.kernel.manifest import parse_manifest
    from aiwfe.kernel.pod import PodRunner
    from aiwfe.kernel.tools import natsauth
    from aiwfe.kernel.tools.embedded import EmbeddedNats
    from aiwfe.kernel.tools.natsauth import pod_user, user_url

    text = SECURED.format(prefix=prefix, probe=PROBE, auth=real_auth_config(pg_url, redis_url, prefix), admin=ADMIN)
    manifest = parse_manifest(text, env={})
    perms = natsauth.permissions(manifest)
    passwords = natsauth.load_passwords(tmp_path / "nats-passwords.json", list(perms))
    server = EmbeddedNats(tmp_path / "nats", config=natsauth.render_config(perms, passwords)).start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            pods = {}
            for name in ("work", "auth", "edge"):
                url = user_url(server.url, pod_user(name), passwords[pod_user(name)])
                pods[name] = await stack.enter_async_context(
                    PodRunner(manifest, name, NatsBus(url, prefix, name=name), ops_port=0)
                )
            gateway_url = str(pods["edge"].plugins["gateway"].public_url)  # type: ignore[attr-defined]
            async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as c:
                user, admin = bearer(await login(c, "alice")), bearer(await login(c, ADMIN))
                assert (await c.get("/v1/console/me", headers=admin)).json() == {"username": ADMIN, "admin": True}
                assert (await c.get("/v1/admin/dead-letters", headers=user)).status_code == 403
                r = await c.post("/v1/jobs", json={"kind": "crunch", "input": {"n": 1, "fail_times": 9}}, headers=user)
                job_id = r.json()["job_id"]
                r = await c.post("/v1/console/jobs", json={"job_id": job_id, "kind": "crunch"}, headers=user)
                assert r.status_code == 201, r.text
                for _ in range(100):
                    letters = (await c.get("/v1/admin/dead-letters", headers=admin)).json()
                    if letters:
                        break
                    await asyncio.sleep(0.1)
                assert [d["job_id"] for d in letters] == [job_id], letters
                assert [h["status"] for h in (await c.get("/v1/console/jobs", headers=user)).json()] == ["failed"]
                r = await c.post(f"/v1/admin/dead-letters/{job_id}/replay", headers=admin)
                assert r.status_code == 200 and r.json() == {"replayed": [job_id]}, r.text
        violations = [line for line in server.log_path.read_text().splitlines() if "Violation" in line]
        assert not [v for v in violations if "user:pod-" in v], "a pod hit its permissions:\n" + "\n".join(violations)
    finally:
        server.stop()
