"""The dashboard of `mcloudtt up` in headless Chromium: served from 127.0.0.1 with nothing
fetched from anywhere else, every broker shown and live, a broker killed from its button turns
red and comes back ready after a restart, with no acknowledged canary message lost.

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`).
The screenshot is kept in `reports/test-artifacts/dashboard.png` (or $MCLOUDTT_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mcloudtt_chaos.procs import wait_for

from .test_up import _try_state, left_behind, up_command

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(
    os.environ.get("MCLOUDTT_ARTIFACTS", Path(__file__).parents[2] / "reports" / "test-artifacts")
)

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason="needs chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.timeout(240)
def test_dashboard_shows_the_cluster_and_breaks_it_at_a_click(tmp_path: Path, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    command, markers, port = up_command(tmp_path, 200, devices=20)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(
            lambda: _try_state(port, lambda s: all(b["ready"] for b in s["brokers"])),
            timeout=60,
            what="every broker ready",
        )
        browser.get(f"http://127.0.0.1:{port}/")
        # The page redraws every second: an element read may be replaced meanwhile (stale).
        wait = WebDriverWait(
            browser, 60, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
        )

        def card(name: str):  # type: ignore[no-untyped-def]
            return browser.find_element(By.ID, f"card-{name}")

        def read(get):  # type: ignore[no-untyped-def]
            return wait.until(lambda d: (get(),))[0]  # a one-tuple: truthy, whatever it holds

        def click(element_id: str) -> None:
            def done(d) -> bool:  # type: ignore[no-untyped-def]
                d.find_element(By.ID, element_id).click()
                return True

            wait.until(done)

        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#brokers .card")) == 3)
        for name in ("broker-1", "broker-2", "broker-3"):
            wait.until(lambda d, name=name: card(name).get_attribute("data-state") == "ready")

        # Live: the numbers change between two reads.
        first = read(lambda: browser.find_element(By.ID, "canary").text)
        first_elapsed = read(lambda: browser.find_element(By.ID, "elapsed").text)
        wait.until(lambda d: d.find_element(By.ID, "canary").text != first)
        wait.until(lambda d: d.find_element(By.ID, "elapsed").text != first_elapsed)

        # Kill broker-2 from its button: red; restart it: ready again.
        click("kill-broker-2")
        wait.until(lambda d: card("broker-2").get_attribute("data-state") == "down")
        wait.until(lambda d: "down" in card("broker-2").get_attribute("class"))
        # Red: the border colour of a down broker.
        wait.until(
            lambda d: (
                card("broker-2").value_of_css_property("border-top-color").replace(" ", "")
                in ("rgba(214,40,40,1)", "rgb(214,40,40)")
            )
        )
        click("restart-broker-2")
        wait.until(lambda d: card("broker-2").get_attribute("data-state") == "ready")
        # The canary keeps publishing through the cluster; none of its acknowledged messages
        # is lost (give the ones around the kill time to arrive).
        published = int(
            _try_state(port, lambda s: s["canary"])["canary"]["published"]  # type: ignore[index]
        )
        wait.until(
            lambda d: (
                int(d.find_element(By.ID, "canary").text.split()[1].replace(",", ""))
                >= published + 3
            )
        )
        assert read(lambda: browser.find_element(By.ID, "lost").text) == "0"
        # And every acknowledged one arrived (not merely "not judged lost yet").
        wait_for(
            lambda: _try_state(
                port,
                lambda s: (
                    s["canary"]["outstanding"] == 0 and s["canary"]["acknowledged"] >= published
                ),
            ),
            timeout=20,
            what="every acknowledged canary message delivered",
        )
        wait.until(lambda d: "broker-2 killed" in d.find_element(By.ID, "log").text)

        # Freeze Redis: the brokers lose their link and readiness; thaw it: they are back.
        click("redis-freeze")
        wait.until(lambda d: d.find_element(By.ID, "redis-state").text == "frozen")
        wait.until(lambda d: "Redis link down" in d.find_element(By.ID, "log").text)
        click("redis-thaw")
        wait.until(lambda d: d.find_element(By.ID, "redis-state").text == "running")
        for name in ("broker-1", "broker-2", "broker-3"):
            wait.until(lambda d, name=name: card(name).get_attribute("data-state") == "ready")
        assert read(lambda: browser.find_element(By.ID, "lost").text) == "0"

        # Nothing was requested from anywhere but this machine.
        urls = browser.execute_script(
            "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
        )
        assert len(urls) >= 2  # the page and its event stream at least
        assert {urlsplit(url).hostname for url in urls} == {"127.0.0.1"}, urls

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0
    time.sleep(0.5)
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left")


# ------------------------------------------------------------------ the figures, recounted


def established(port: int) -> int:
    """Established TCP connections whose server end is `port`, counted by the kernel."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


@pytest.mark.timeout(240)
def test_dashboard_figures_match_independent_counts(tmp_path: Path, browser) -> None:  # type: ignore[no-untyped-def]
    """Connections against the kernel's socket table, retained topics against the broker's own
    gauge, the client lookup against a client the test connected itself, the analytics against
    DuckDB recounted after the run; and the page draws them (charts, tree, lookup)."""
    import duckdb
    import paho.mqtt.client as mqtt
    from mcloudtt_chaos.procs import http_get, scrape
    from paho.mqtt.enums import CallbackAPIVersion
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from .test_up import METADATA, state

    command, markers, port = up_command(tmp_path, 200, devices=30)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = None
    try:
        snap = wait_for(
            lambda: _try_state(
                port,
                lambda s: all(b["ready"] for b in s["brokers"]) and (s["adapter"] or {})["rows"],
            ),
            timeout=60,
            what="every broker ready, rows stored",
        )
        brokers = {b["name"]: b for b in snap["brokers"]}
        # A client of the test's own on broker-2, with two subscriptions.
        probe = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="lookup-probe", clean_session=False
        )
        b2_port = int(brokers["broker-2"]["mqtt"].rsplit(":", 1)[1])
        probe.connect("127.0.0.1", b2_port)
        probe.loop_start()
        wait_for(probe.is_connected, timeout=10, what="the probe connected")
        probe.subscribe([("lookup/a/#", 1), ("lookup/b", 0)])

        # Connections: what the dashboard shows is what the kernel has (read together, until
        # both agree on one second: clients may still be connecting).
        def connections_agree() -> bool:
            live = {b["name"]: b["connections"] for b in state(port)["brokers"]}
            kernel = {
                name: established(int(b["mqtt"].rsplit(":", 1)[1])) for name, b in brokers.items()
            }
            return live == kernel and sum(kernel.values()) >= 30

        wait_for(connections_agree, timeout=30, what="connections as the kernel counts them")

        # Retained messages: the tree's count is the broker's own gauge.
        def retained_agree():  # type: ignore[no-untyped-def]
            _, body = http_get(port, "/topics?fresh=1", timeout=10)
            topics = json.loads(body)
            holder = next(b for b in snap["brokers"] if b["name"] == topics["broker"])
            gauge = scrape(holder["http"]).value("mcloudtt_retained_messages")
            retained = [r for r in topics["rows"] if "retained" in r]
            return topics if len(retained) == topics["retained"] == gauge > 0 else None

        topics = wait_for(retained_agree, timeout=30, what="retained topics as the broker counts")

        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(
            browser, 60, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
        )
        # Charts from DuckDB: a rollup per measurement, per-device series, with units.
        analytics = wait_for(
            lambda: (a := json.loads(http_get(port, "/analytics")[1])) and a["rollups"] and a,
            timeout=30,
            what="analytics",
        )
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "svg.chart[data-kind=rollup]"))
        drawn = {
            e.get_attribute("data-metric")
            for e in browser.find_elements(By.CSS_SELECTOR, "svg.chart[data-kind=rollup]")
        }
        assert drawn and not drawn & (METADATA | {"uptime", "connected"}), drawn
        assert drawn <= set(json.loads(http_get(port, "/analytics")[1])["rollups"]) | set(
            analytics["rollups"]
        )
        assert "temp (°C)" in browser.find_element(By.ID, "an-rollups").text
        wait.until(
            lambda d: any(
                int(e.get_attribute("data-points")) > 0
                for e in d.find_elements(By.CSS_SELECTOR, "#an-series polyline.line")
            )
        )
        # The topic tree: as many retained leaves as the broker holds.
        browser.find_element(By.ID, "topics-refresh").click()
        wait.until(
            lambda d: (
                len(d.find_elements(By.CSS_SELECTOR, "#topics .leaf.retained"))
                == topics["retained"]
            )
        )
        # The client lookup finds the probe on broker-2 with its subscriptions.
        box = browser.find_element(By.ID, "client-id")
        box.send_keys("lookup-probe")
        browser.find_element(By.ID, "client-find").click()
        wait.until(
            lambda d: (
                d.find_element(By.ID, "client-holder").get_attribute("data-holder") == "broker-2"
            )
        )
        subs = browser.find_element(By.ID, "client-subs").text
        assert "lookup/a/# 1" in subs and "lookup/b 0" in subs
        assert browser.find_element(By.ID, "client-inflight").text == "0"
        # A takeover: the same ClientId on broker-3 takes its session (and subscriptions) over.
        probe.disconnect()
        probe.loop_stop()
        probe = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="lookup-probe", clean_session=False
        )
        probe.connect("127.0.0.1", int(brokers["broker-3"]["mqtt"].rsplit(":", 1)[1]))
        probe.loop_start()
        moved = wait_for(
            lambda: (
                (c := json.loads(http_get(port, "/client?id=lookup-probe")[1]))["holder"]
                == "broker-3"
                and c["connected"]
                and c
            ),
            timeout=20,
            what="the lookup finds the client on broker-3",
        )
        assert sorted(x["filter"] for x in moved["session"]["subscriptions"]) == [
            "lookup/a/#",
            "lookup/b",
        ]
        wait.until(lambda d: "broker-3 took over 1 session" in d.find_element(By.ID, "log").text)
        # The fleet's devices: every connection but the canary's six clients.
        live = state(port)
        assert live["fleet"]["devices"] == live["fleet"]["connections"] - 6
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.set_window_size(1400, 3400)
        assert browser.save_screenshot(str(ARTIFACTS / "dashboard-analytics.png"))
        urls = browser.execute_script(
            "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
        )
        assert {urlsplit(url).hostname for url in urls} == {"127.0.0.1"}, urls
    finally:
        if probe is not None:
            probe.disconnect()
            probe.loop_stop()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0
    # The final page's analytics, recounted in DuckDB up to the newest row they included.
    final = (tmp_path / "report-dashboard.html").read_text()
    data = json.loads(
        final.split("const FINAL=", 1)[1].split(";\nif(FINAL)", 1)[0].replace("<\\/", "</")
    )
    a = data["analytics"]
    with duckdb.connect(str(tmp_path / "up.duckdb"), read_only=True) as con:
        cut = f"ingest_time <= make_timestamp({a['as_of_ingest_us']})"
        total = con.execute(f"select count(*) from messages where {cut}").fetchone()[0]  # type: ignore[index]
        per_topic = con.execute(
            f"select topic, count(*) from messages where {cut} group by 1 order by 1"
        ).fetchall()
        canary = {
            json.loads(bytes(payload))["seq"]
            for (payload,) in con.execute(
                "select payload from messages where topic = 'mcloudtt/canary'"
            ).fetchall()
        }
    assert a["total_messages"] == total > 0
    assert [tuple(t) for t in a["topics"]] == per_topic
    # The canary's figures: every probe it counted as acknowledged went through the cluster's
    # tap into DuckDB (no fault in this run), and it counted none lost.
    assert data["canary"]["lost"] == 0 and data["canary"]["acknowledged"] > 5
    assert canary >= set(range(1, data["canary"]["acknowledged"] + 1))
    assert wait_for(lambda: not left_behind(markers), timeout=10, what="no process left")
