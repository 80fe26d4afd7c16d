"""The gateway's web page and what it reads: ``/`` and its static files, ``/v1/cluster`` (nodes, ranges,
ghosts, the join command), ``parallax evict``, and a real browser (Debian's Chromium driven by
Playwright, never a downloaded browser) that loads the page against a 2-stage cluster, sees both
stages and their ranges, and chats with a streamed answer."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from parallax.broker.errors import UsageError
from parallax.broker.kv import nodes_bucket
from parallax.broker.registry import NodeInfo
from parallax.gateway.watch import join_command, reachable_nats
from parallax.status import build_status, render_table
from parallax.watch import evict
from tests.watchkit import LAYERS, MODEL, Served, served, tiny_model

pytestmark = pytest.mark.asyncio(loop_scope="module")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(nats_module):
    async with served(nats_module, tiny_model()) as s:
        yield s


async def put_record(url: str, info: NodeInfo, ttl_s: int = 60) -> None:
    nc = await nats.connect(url)
    try:
        await (await nodes_bucket(nc)).create(info.key, info.model_dump_json().encode(), msg_ttl=ttl_s)
    finally:
        await nc.close()


async def test_the_page_and_its_files_are_served(gw: Served):
    page = await gw.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, kind in (("app.js", "javascript"), ("markdown.js", "javascript"), ("style.css", "text/css")):
        assert f"/web/{name}" in page.text
        response = await gw.client.get(f"/web/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    assert (await gw.client.get("/web/nope.js")).status_code == 404


async def test_cluster_json_shows_the_stages_their_ranges_and_ghosts(gw: Served, nats_module):
    await put_record(nats_module, NodeInfo(node_id="ghost-1", model=MODEL, start=0, end=3, num_layers=LAYERS,
                                           updated=time.time() - 120))
    data = (await gw.client.get("/v1/cluster")).json()
    stages = {n["node_id"]: n for n in data["nodes"] if n["kind"] == "stage"}
    assert {(n["start"], n["end"]) for i, n in stages.items() if i in gw.cluster.stages} == {(0, 3), (3, LAYERS)}
    assert stages["ghost-1"]["health"] == "stale" and stages["ghost-1"]["age_s"] >= 119
    assert all(stages[i]["health"] == "ok" for i in gw.cluster.stages)
    assert data["served_model"] == MODEL and data["models"][MODEL]["complete"] is True
    assert data["join"] == f"parallax-stage --model {MODEL} --nats {nats_module} --layers 0:3"  # no scheduler
    assert "GHOSTS: no heartbeat for over 5 s: ghost-1 (stage, 120 s)" in render_table(build_status(
        {f"stage.{i}": NodeInfo.model_validate(n).model_dump_json().encode() for i, n in stages.items()},
        now=time.time()))

    nc = await nats.connect(nats_module)
    try:
        live = next(iter(gw.cluster.stages))
        with pytest.raises(UsageError, match=f"stage.{live} is alive"):
            await evict(nc, live)
        with pytest.raises(UsageError, match="no node 'nobody' in the registry"):
            await evict(nc, "nobody")
    finally:
        await nc.close()
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "parallax.cli", "evict", "ghost-1", "--nats",
                                                    nats_module], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "evicted stage.ghost-1", done.stderr
    data = (await gw.client.get("/v1/cluster")).json()
    assert "ghost-1" not in {n["node_id"] for n in data["nodes"]}


async def test_the_join_command_names_a_reachable_nats_and_the_missing_layers():
    status = {"leader": None, "models": {"m": {"missing": [[4, 8]], "coverage": [{"start": 0, "end": 4}]}}}
    assert join_command("m", "nats://127.0.0.1:4222", "10.1.2.3", status) == \
        "parallax-stage --model m --nats nats://10.1.2.3:4222 --layers 4:8"
    assert join_command("m", "nats://user:secret@nats.lan:4333", "x", status | {"leader": "s1"}) == \
        "parallax-stage --model m --nats nats://nats.lan:4333"  # a scheduler places it; no credentials shown
    assert reachable_nats("nats://localhost:4222", "127.0.0.1") == "nats://localhost:4222"
    assert reachable_nats("nats://127.0.0.1:4222", "::1") == "nats://127.0.0.1:4222"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup.sh "
                    "installs it): the browser test needs a system Chromium, never a downloaded one")
async def test_a_browser_sees_both_stages_and_chats_with_a_streamed_answer(gw: Served, tmp_path):
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            await page.goto(gw.url + "/")
            for node_id, (start, end) in zip(gw.cluster.stages, ((0, 3), (3, LAYERS))):
                bar = page.locator(f'[data-node="{node_id}"] .range')
                await bar.wait_for(timeout=15_000)
                assert await bar.get_attribute("data-range") == f"{start}:{end}"
                assert await bar.bounding_box()  # drawn, with a size
            assert "parallax-stage --model tiny" in await page.locator("#join").text_content()

            await page.fill("#max-tokens", "12")
            await page.fill("#temperature", "0")
            await page.fill("#prompt", "Hello there")
            await page.click("#send")
            answer = page.locator('.msg.assistant[data-done="1"]')
            await answer.wait_for(timeout=60_000)
            raw, chunks = await answer.get_attribute("data-raw"), int(await answer.get_attribute("data-chunks"))
            await page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
            rendered = await page.evaluate(r"md.render('# Title\n**bold** and `x<y` [a](https://e.org) [b](javascript:x)"
                                           r"\n\n```py\n<b>hi</b>\n```\n- one\n- two\n<img src=x onerror=alert(1)>')")
        finally:
            await browser.close()
    assert rendered == (  # markdown rendered, every piece of model text escaped, no javascript: link
        '<h3>Title</h3><p><strong>bold</strong> and <code>x&lt;y</code> <a href="https://e.org" target="_blank" '
        'rel="noopener noreferrer">a</a> [b](javascript:x)</p><pre><code class="language-py">&lt;b&gt;hi&lt;/b&gt;</code>'
        '</pre><ul><li>one</li><li>two</li></ul><p>&lt;img src=x onerror=alert(1)&gt;</p>')
    assert (tmp_path / "web.png").stat().st_size > 10_000
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12, "temperature": 0}
    expected = (await gw.client.post("/v1/chat/completions", json=body)).json()["choices"][0]["message"]["content"]
    assert raw == expected and chunks > 1  # the same greedy answer, arrived in pieces
