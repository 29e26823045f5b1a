"""`gpu-run dashboard`: the real command serving a temp ledger, asked over HTTP (the token, CSRF,
the run folder's walls) and, in the tests marked integration, driven in Debian's headless chromium
(the runs page, a curve that grows, a hostile run, the NOT STOPPED banner and its retry, a
cross-origin form). Each browser test writes a screenshot into build/screenshots/."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpu_run.ledger import Ledger
from tests.conftest import ROOT, missing_test_bed, wait_for

SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1400")
HOST_CONFIG = """[hosts.t4-box]
ssh = "t4-box"
price_per_hour = 0.8
currency = "CNY"
billing = "per_second"
stop_command = "true"
"""
# What a hostile host writes: each would set window.__pwned (or call alert) if it ever ran.
PAYLOADS = ("<script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned = 2">',
            '<a href="javascript:window.__pwned = 3">click me</a>', "<svg onload=\"alert('x')\"></svg>")


# The dashboard, as a user starts it ---------------------------------------------------------------

class Dashboard:
    """`gpu-run dashboard --port 0` in a subprocess, its address read from what it prints."""

    def __init__(self, cwd: Path, env: dict | None = None):
        self.output: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "dashboard", "--port", "0"], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env or dict(os.environ))
        threading.Thread(target=self._read, daemon=True).start()
        line = wait_for(lambda: next((l for l in self.output if "http://127.0.0.1:" in l), None) or self.proc.poll() is not None,
                        60, "the dashboard to print its address")
        assert isinstance(line, str), f"the dashboard exited: {self.output}"
        self.url = line.split()[-1]
        self.base, _, query = self.url.partition("/?")
        self.token = query.removeprefix("token=")
        self.port = int(self.base.rsplit(":", 1)[1])
        self.cookie = f"gpu_run_dashboard_{self.port}={self.token}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.rstrip("\n"))

    def request(self, method: str, path: str, headers: dict | None = None, cookie: bool = True,
                body: bytes | None = None) -> tuple[int, dict, bytes]:
        """One request with the path sent exactly as written (no client normalises a `..` away)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        sent = {"Host": f"127.0.0.1:{self.port}", **({"Cookie": self.cookie} if cookie else {}), **(headers or {})}
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for key, value in sent.items():
            conn.putheader(key, value)
        conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body or b"")
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def post(self, path: str, origin: str | None = "self", csrf: str | None = "page") -> tuple[int, dict, bytes]:
        headers = {}
        if origin is not None:
            headers["Origin"] = self.base if origin == "self" else origin
        if csrf is not None:
            headers["X-CSRF-Token"] = self.csrf() if csrf == "page" else csrf
        return self.request("POST", path, headers)

    def csrf(self) -> str:
        _, _, page = self.request("GET", "/costs")
        return page.decode().split('name="csrf-token" content="', 1)[1].split('"', 1)[0]

    def stop(self) -> int:
        """Ctrl-C, as a user ends it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def work(tmp_path, gpu_run_home) -> Path:
    """The folder the user runs gpu-run in: a priced host in gpu-run.toml, runs/ beside it."""
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "gpu-run.toml").write_text(HOST_CONFIG)
    return folder


@pytest.fixture
def ledger(work) -> Ledger:
    from gpu_run.paths import ledger_path

    led = Ledger(ledger_path())
    yield led
    led.close()


@pytest.fixture
def dashboard(work, ledger):
    board = Dashboard(work)
    yield board
    board.stop()


def epoch_line(epoch: int, **more) -> str:
    record = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5 + epoch / 40, "val_loss": 1.1 / epoch,
              "val_acc": 0.45 + epoch / 40, "lr": 0.001, "epoch_time_s": 4.0, "train_images_per_s": 120.0, **more}
    return json.dumps(record) + "\n"


def add_run(ledger: Ledger, work: Path, run_id: str, host: str = "local", status: str = "succeeded", epochs: int = 0,
            log: str = "", age_s: float = 0.0, **fields) -> Path:
    """A run as the ledger and its folder hold it once `gpu-run train` wrote them."""
    run_dir = work / "runs" / run_id
    run_dir.mkdir(parents=True)
    if epochs:
        (run_dir / "metrics.jsonl").write_text("".join(epoch_line(e) for e in range(1, epochs + 1)))
    if log:
        (run_dir / "train.log").write_text(log)
    created = time.time() - age_s
    ended = None if status in ("running", "created", "detached") else created + 300
    ledger.create_run(run_id, host, status=status, created_at=created, run_dir=str(run_dir), ended_at=ended, **fields)
    return run_dir


# Over HTTP: the token, CSRF, the run folder's walls ------------------------------------------------

def test_no_token_is_403_and_the_token_becomes_a_cookie(dashboard, ledger, work):
    add_run(ledger, work, "20260101-000000-aaaa", model="resnet18", epochs=2)
    for path in ("/", "/runs/20260101-000000-aaaa", "/api/runs/20260101-000000-aaaa", "/costs", "/compare",
                 "/static/dashboard.js", "/vendor/plotly.min.js", "/runs/20260101-000000-aaaa/files/metrics.jsonl"):
        status, _, body = dashboard.request("GET", path, cookie=False)
        assert status == 403, path
        assert b"20260101-000000-aaaa" not in body
        assert dashboard.request("GET", path + "?token=wrong", cookie=False)[0] == 403, path
        assert dashboard.request("GET", path, headers={"Cookie": f"gpu_run_dashboard_{dashboard.port}=wrong"},
                                 cookie=False)[0] == 403
    # The printed address works once, then the cookie carries the token and the address bar loses it.
    status, headers, _ = dashboard.request("GET", "/?token=" + dashboard.token, cookie=False)
    assert status == 303 and headers["location"] == "/"
    assert f"gpu_run_dashboard_{dashboard.port}={dashboard.token}" in headers["set-cookie"]
    assert "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    status, headers, body = dashboard.request("GET", "/")
    assert status == 200 and b"20260101-000000-aaaa" in body
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "unsafe-inline" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    # Another name for 127.0.0.1 (DNS rebinding) is refused even with the token.
    assert dashboard.request("GET", "/", headers={"Host": "evil.example:80"})[0] == 403
    # Ctrl-C ends it.
    assert dashboard.stop() == 0
    assert "dashboard stopped" in dashboard.output


def test_a_cross_origin_post_is_refused_and_a_get_changes_nothing(dashboard, ledger, work):
    add_run(ledger, work, "20260101-000000-bbbb", host="local", stop_status="failed", stop_detail="stop command failed",
            handle_json=json.dumps({"backend": "process", "runtime": "python", "versions": {"python": sys.executable}}))
    path = "/runs/20260101-000000-bbbb/retry-stop"
    assert dashboard.post(path, origin="http://evil.example")[0] == 403
    assert dashboard.post(path, origin="http://127.0.0.1:1")[0] == 403  # another port is another origin
    assert dashboard.post(path, origin=None)[0] == 403
    assert dashboard.post(path, csrf=None)[0] == 403
    assert dashboard.post(path, csrf="0" * 64)[0] == 403
    status, _, _ = dashboard.request("GET", path)
    assert status == 405  # a GET never changes anything
    time.sleep(1)
    assert ledger.get_run("20260101-000000-bbbb").stop_status == "failed"
    # From the page itself (its Origin and CSRF token), the same POST is taken.
    status, _, body = dashboard.post(path)
    assert status == 202, body
    action = json.loads(body)["action"]
    state = wait_for(lambda: (s := json.loads(dashboard.request("GET", f"/api/actions/{action}")[2]))["state"] != "running"
                     and s, 60, "the retried stop to end")
    assert state["state"] == "done" and state["ok"], state
    assert ledger.get_run("20260101-000000-bbbb").stop_status == "not_needed"


def test_files_are_served_only_from_inside_the_run_folder(dashboard, ledger, work, tmp_path):
    run_dir = add_run(ledger, work, "20260101-000000-cccc", epochs=1)
    secret = tmp_path / "secret.txt"
    secret.write_text("the laptop's secret")
    (run_dir / "report").mkdir()
    (run_dir / "report" / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 64)
    (run_dir / "page.html").write_text("<script>window.__pwned = 1</script>")
    (run_dir / "out-link").symlink_to(secret)
    (run_dir / "out-dir").symlink_to(tmp_path)
    (run_dir / "in-link").symlink_to(run_dir / "metrics.jsonl")
    base = "/runs/20260101-000000-cccc/files/"
    for path in ("../../secret.txt", "..%2f..%2fsecret.txt", "%2e%2e/%2e%2e/secret.txt", "report/../../../secret.txt",
                 "out-link", "out-dir/secret.txt", str(secret), "%00", "report", ""):
        status, _, body = dashboard.request("GET", base + path)
        assert status in (403, 404), path
        assert b"secret" not in body.replace(b"secret.txt", b""), path
    status, headers, body = dashboard.request("GET", base + "metrics.jsonl")
    assert status == 200 and body.startswith(b'{"epoch": 1')
    assert headers["content-type"] == "application/octet-stream" and headers["content-disposition"].startswith("attachment")
    assert dashboard.request("GET", base + "in-link")[0] == 200  # a link that stays inside is the file
    status, headers, _ = dashboard.request("GET", base + "page.html")  # a host's page is a download, never a page
    assert status == 200 and headers["content-type"] == "application/octet-stream"
    status, headers, _ = dashboard.request("GET", base + "report/curves.png")
    assert status == 200 and headers["content-type"] == "image/png"
    # The listing on the run's page names neither link that leads out.
    _, _, page = dashboard.request("GET", "/runs/20260101-000000-cccc")
    assert b"out-link" not in page and b"out-dir" not in page and b"page.html" in page


def test_the_live_json_has_the_curves_log_phases_and_cost(dashboard, ledger, work):
    run_dir = add_run(ledger, work, "20260101-000000-dddd", host="t4-box", status="running", epochs=3,
                      log="step 1\rstep 2\rstep 3\nepoch 1 done\n\x1b[31mred\x1b[0m\n", billed_from=time.time() - 3600,
                      currency="CNY", args_json=json.dumps({"spec": {"budget": 2.0}}))
    ledger.start_phase("20260101-000000-dddd", "setup", at=time.time() - 3600)
    ledger.end_phase("20260101-000000-dddd", "setup", at=time.time() - 3500)
    ledger.start_phase("20260101-000000-dddd", "train", at=time.time() - 3500)
    live = json.loads(dashboard.request("GET", "/api/runs/20260101-000000-dddd")[2])
    assert live["metrics"]["epochs"] == [1, 2, 3]
    assert set(live["metrics"]["charts"]["loss"]) == {"train_loss", "val_loss"}
    assert live["log"]["lines"] == ["step 3", "epoch 1 done", "red"]  # a bar's last redraw; no escape sequence
    assert [p["phase"] for p in live["phases"]] == ["setup", "train"]
    assert live["cost"]["budget"] == 2.0 and live["cost"]["so_far"]
    assert 0.79 <= live["cost"]["amount"] <= 0.81 and live["cost"]["currency"] == "CNY"  # an hour at 0.8 CNY
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("not json\n" + epoch_line(4))
    live = json.loads(dashboard.request("GET", "/api/runs/20260101-000000-dddd")[2])
    assert live["metrics"]["epochs"] == [1, 2, 3, 4] and live["metrics"]["skipped"] == 1
    # While `gpu-run train` follows a run, only train.log grows here: its epoch events are the curve.
    with open(run_dir / "train.log", "a") as f:
        f.write(json.dumps({"event": "epoch", "time": 1.0, **json.loads(epoch_line(5)), "epochs": 9}) + "\n")
    live = json.loads(dashboard.request("GET", "/api/runs/20260101-000000-dddd")[2])
    assert live["metrics"]["epochs"] == [1, 2, 3, 4, 5]
    assert live["metrics"]["charts"]["accuracy"]["val_acc"][-1] == pytest.approx(0.45 + 5 / 40)


def test_runs_table_pages_never_split_a_sweep(ledger, work):
    from gpu_run.config import load_config
    from gpu_run.dashboard.views import SweepGroup, runs_table

    for i in range(3):
        add_run(ledger, work, f"20260101-00000{i}-solo", age_s=100 - i)
    for point in range(3):
        add_run(ledger, work, f"20260101-00001{point}-swep", sweep_id="sweep-a", sweep_point=point, age_s=200 - point)
    add_run(ledger, work, "20260101-000020-last", status="failed", age_s=300)
    config = load_config(work)
    pages = [runs_table(ledger, config, page=n, per_page=2) for n in (1, 2, 3)]
    assert [p["pages"] for p in pages] == [3, 3, 3] and pages[0]["total"] == 7
    ids = [[i.sweep_id if isinstance(i, SweepGroup) else i.run_id for i in p["items"]] for p in pages]
    assert ids == [["20260101-000002-solo", "20260101-000001-solo"], ["20260101-000000-solo", "sweep-a"],
                   ["20260101-000020-last"]]
    assert [r.sweep_point for r in pages[1]["items"][1].rows] == [0, 1, 2]  # the whole sweep, in the grid's order
    assert runs_table(ledger, config, page=9, per_page=2)["page"] == 3
    failed = runs_table(ledger, config, status="failed", per_page=None)
    assert [i.run_id for i in failed["items"]] == ["20260101-000020-last"] and failed["matching"] == 1


# In the browser ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    """Debian's chromium through its chromedriver; nothing is downloaded."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e .[dev])")
    if missing:
        missing_test_bed(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver")
    profile = tempfile.mkdtemp(prefix="gpu-run-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    # Before any page's own script: record what a payload would do, whatever the page does after.
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.__attempts = [];
        Object.defineProperty(window, "__pwned", {set(v) { window.__attempts.push(String(v)); }, get() { return undefined; }});
        window.alert = (m) => window.__attempts.push("alert " + m);
        document.addEventListener("securitypolicyviolation", (e) => window.__attempts.push("csp " + e.violatedDirective + " " + e.sourceFile));
    """})
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium, dashboard):
    """The browser with the dashboard's cookie, as after opening the printed address."""
    chromium.delete_all_cookies()
    chromium.get(dashboard.url)
    wait_for(lambda: chromium.current_url == dashboard.base + "/", 20, "the token to leave the address bar")
    return chromium


def text_of(driver, selector: str) -> str:
    return driver.find_element("css selector", selector).text


def script_attempts(driver) -> list[str]:
    """What a payload tried (a CSP refusal from plotly's map library's own style is not one)."""
    return [a for a in driver.execute_script("return window.__attempts") if "plotly.min.js" not in a]


@pytest.mark.integration
def test_runs_page_lists_the_ledger(browser, dashboard, ledger, work):
    add_run(ledger, work, "20260101-000001-a001", model="resnet18", epochs=3, best_val_acc=0.875, cost_amount=0.0,
            currency="USD", stop_status="not_needed", age_s=5000)
    add_run(ledger, work, "20260101-000002-a002", host="t4-box", model="python train.py --epochs 20", status="failed",
            args_json=json.dumps({"command": ["python", "train.py", "--epochs", "20"]}), billed_from=time.time() - 1800,
            billed_to=time.time() - 900, currency="CNY", stop_status="stopped", age_s=4000)
    ledger.create_sweep("sweep-20260101-0000-ab", "t4-box", status="succeeded")
    for point in (1, 0):  # written out of order: the page shows the grid's order
        add_run(ledger, work, f"20260101-00000{3 + point}-p00{point}", host="t4-box", model="resnet18",
                sweep_id="sweep-20260101-0000-ab", sweep_point=point, best_val_acc=0.5 + point / 10, currency="CNY",
                stop_status="handed_over", age_s=3000 - point)
    add_run(ledger, work, "20260101-000009-mn01", host="box-a,box-b", model="resnet50", status="running",
            args_json=json.dumps({"nodes": ["box-a", "box-b"]}), age_s=10)
    browser.get(dashboard.base + "/")
    rows = browser.find_elements("css selector", "#runs-table tbody tr")
    order = [r.get_attribute("data-run") or r.get_attribute("data-sweep") for r in rows]
    assert order == ["20260101-000009-mn01", "sweep-20260101-0000-ab", "20260101-000003-p000", "20260101-000004-p001",
                     "20260101-000002-a002", "20260101-000001-a001"]  # newest first, points under their sweep
    first = text_of(browser, 'tr[data-run="20260101-000001-a001"]')
    assert "resnet18" in first and "succeeded" in first and "87.5%" in first and "5m00s" in first and "0.00 USD" in first
    command = text_of(browser, 'tr[data-run="20260101-000002-a002"]')
    assert "python train.py --epochs 20" in command and "failed" in command and "0.20 CNY" in command  # 15 min at 0.8
    assert "box-a, box-b" in text_of(browser, 'tr[data-run="20260101-000009-mn01"]')
    assert "2 point(s)" in text_of(browser, 'tr[data-sweep="sweep-20260101-0000-ab"]')
    assert "#1" in text_of(browser, 'tr[data-run="20260101-000004-p001"]')
    assert browser.find_element("id", "not-stopped").get_attribute("hidden") is not None  # nothing is billing
    browser.save_screenshot(str(SCREENSHOTS / "runs.png"))
    # The host filter: picking one submits the form.
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("css selector", 'select[name="host"]')).select_by_value("t4-box")
    wait_for(lambda: "host=t4-box" in browser.current_url, 20, "the filter to apply")
    shown = [r.get_attribute("data-run") for r in browser.find_elements("css selector", "#runs-table tbody tr[data-run]")]
    assert sorted(shown) == ["20260101-000002-a002", "20260101-000003-p000", "20260101-000004-p001"]
    Select(browser.find_element("css selector", 'select[name="status"]')).select_by_value("failed")
    wait_for(lambda: "status=failed" in browser.current_url, 20, "the status filter to apply")
    assert [r.get_attribute("data-run") for r in browser.find_elements("css selector", "#runs-table tbody tr[data-run]")] \
        == ["20260101-000002-a002"]
    # Compare: tick two runs with metrics, get the compare table.
    add_run(ledger, work, "20260101-000010-c001", model="mobilenet_v3_large", epochs=4, age_s=1)
    browser.get(dashboard.base + "/")
    browser.find_element("id", "pick-compare").click()
    for run_id in ("20260101-000001-a001", "20260101-000010-c001"):
        browser.find_element("css selector", f'input[value="{run_id}"]').click()
    browser.find_element("id", "compare-ticked").click()
    wait_for(lambda: "/compare" in browser.current_url, 20, "the compare page")
    table = text_of(browser, "#compare-table")
    assert "20260101-000001-a001" in table and "52.50%" in table  # compare.py's best val acc: 0.45 + 3/40
    assert "20260101-000010-c001" in table and "55.00%" in table
    browser.save_screenshot(str(SCREENSHOTS / "compare.png"))


@pytest.mark.integration
def test_a_runs_curve_gains_points_while_metrics_grow(browser, dashboard, ledger, work):
    run_id = "20260101-000000-live"
    run_dir = add_run(ledger, work, run_id, host="t4-box", model="resnet18", status="running", epochs=2,
                      log="epoch 1 done\nepoch 2 done\n", billed_from=time.time() - 600, currency="CNY",
                      args_json=json.dumps({"spec": {"budget": 1.0}}))
    ledger.start_phase(run_id, "setup", at=time.time() - 600)
    ledger.end_phase(run_id, "setup", at=time.time() - 540)
    ledger.start_phase(run_id, "sync", at=time.time() - 540)
    ledger.end_phase(run_id, "sync", at=time.time() - 500)
    ledger.start_phase(run_id, "train", at=time.time() - 500)
    browser.get(f"{dashboard.base}/runs/{run_id}")

    def points() -> list[int]:
        return browser.execute_script("""return ["loss-chart", "accuracy-chart"].map((id) => {
            const chart = document.getElementById(id);
            return chart.data && chart.data.length ? chart.data[0].x.length : 0; });""")

    wait_for(lambda: points() == [2, 2], 30, "the charts to show 2 epochs")
    for epoch in (3, 4):
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(epoch_line(epoch))
        with open(run_dir / "train.log", "a") as f:
            f.write(f"epoch {epoch} done\n")
        started = time.monotonic()
        wait_for(lambda: points() == [epoch, epoch], 15, f"the charts to gain epoch {epoch}")
        assert time.monotonic() - started < 10
    values = browser.execute_script("return document.getElementById('accuracy-chart').data.map((t) => [t.name, t.y]);")
    assert values[1][0] == "val acc" and values[1][1][-1] == pytest.approx((0.45 + 4 / 40) * 100)
    wait_for(lambda: "epoch 4 done" in text_of(browser, "#log"), 10, "the log to show the new line")
    assert [e.text for e in browser.find_elements("css selector", "#phase-line text")] == ["setup", "sync", "train"]
    assert "of a 1.00 CNY budget" in text_of(browser, ".cost")
    assert browser.find_element("id", "budget-meter").get_attribute("hidden") is None
    assert "Stop the run" in text_of(browser, ".actions")
    assert script_attempts(browser) == []
    browser.save_screenshot(str(SCREENSHOTS / "run.png"))


@pytest.mark.integration
def test_a_hostile_runs_text_shows_as_text_and_nothing_runs(browser, dashboard, ledger, work):
    run_id = "20260101-000000-evil"
    payload = " ".join(PAYLOADS)
    run_dir = add_run(ledger, work, run_id, model=payload, status="failed", log="".join(p + "\n" for p in PAYLOADS),
                      stop_status="failed", stop_detail=payload,
                      summary_json=json.dumps({"error": payload, "status": "failed"}))
    (run_dir / "metrics.jsonl").write_text(epoch_line(1, **{p: 0.5 for p in PAYLOADS}, note=payload))
    (run_dir / '<img src=x onerror="window.__pwned = 4">.txt').write_text("x")
    ledger.start_phase(run_id, "train", at=time.time() - 60)
    ledger.end_phase(run_id, "train", "failed", payload, at=time.time() - 30)
    for page in ("/", f"/runs/{run_id}", "/costs", f"/compare?runs={run_id}"):
        browser.get(dashboard.base + page)
        if page.startswith("/runs/"):
            wait_for(lambda: "window.__pwned = 2" in text_of(browser, "#last-epoch"), 20, "the last epoch's table")
        body = text_of(browser, "body")
        assert PAYLOADS[0] in body, page  # shown, as the text it is
        assert script_attempts(browser) == [], page
        assert browser.execute_script("""return [document.querySelectorAll('img[src="x"], svg[onload], [onerror]').length,
            document.querySelectorAll('a[href^="javascript:"]').length,
            [...document.scripts].filter((s) => !s.src.startsWith(location.origin)).length]""") == [0, 0, 0], page
        if page.startswith("/runs/"):
            assert PAYLOADS[1] in text_of(browser, "#log") and PAYLOADS[2] in text_of(browser, "#log")
            assert PAYLOADS[3] in text_of(browser, "#phase-table")
            assert '<img src=x onerror="window.__pwned = 4">.txt' in text_of(browser, "#files")
            browser.save_screenshot(str(SCREENSHOTS / "hostile-run.png"))
    # The hook sees what a payload does; and were a payload ever put into the page as HTML, the
    # Content-Security-Policy would still refuse its inline handler.
    browser.execute_script("window.__pwned = 5")
    browser.execute_script("document.body.insertAdjacentHTML('beforeend', arguments[0])", PAYLOADS[1])
    attempts = wait_for(lambda: (a := script_attempts(browser)) and any(x.startswith("csp script-src") for x in a) and a,
                        10, "the policy to refuse the inline handler")
    assert "5" in attempts and "2" not in attempts


@pytest.mark.integration
def test_not_stopped_banner_shows_everywhere_and_its_retry_stops(browser, dashboard, ledger, work):
    run_id = "20260101-000000-stop"
    add_run(ledger, work, run_id, host="local", model="resnet18", stop_status="failed",
            stop_detail="stop command exited 1", epochs=2,
            handle_json=json.dumps({"backend": "process", "runtime": "python", "versions": {"python": sys.executable}}))
    add_run(ledger, work, "20260101-000000-fine", host="local", stop_status="not_needed", epochs=1)
    for page in ("/", f"/runs/{run_id}", "/costs", "/compare"):
        browser.get(dashboard.base + page)
        banner = browser.find_element("id", "not-stopped")
        assert banner.is_displayed(), page
        assert run_id in banner.text and "stop command exited 1" in banner.text and "NOT STOPPED" in banner.text
        assert "20260101-000000-fine" not in banner.text
        if page == "/costs":
            assert "NOT STOPPED" in text_of(browser, "#costs-not-stopped")
            browser.save_screenshot(str(SCREENSHOTS / "costs.png"))
    browser.get(dashboard.base + "/")
    browser.find_element("css selector", "#not-stopped button.action").click()
    dialog = browser.find_element("id", "confirm")
    assert dialog.is_displayed() and run_id in text_of(browser, "#confirm-text")
    browser.find_element("id", "confirm-no").click()  # Cancel: nothing is sent
    time.sleep(0.5)
    assert ledger.get_run(run_id).stop_status == "failed"
    browser.find_element("css selector", "#not-stopped button.action").click()
    browser.save_screenshot(str(SCREENSHOTS / "confirm.png"))
    browser.find_element("id", "confirm-yes").click()
    wait_for(lambda: "done" in text_of(browser, "#action-result"), 60, "the retried stop's result")
    assert "not_needed" in text_of(browser, "#action-result")
    wait_for(lambda: not browser.find_element("id", "not-stopped").is_displayed(), 20, "the banner to go")
    assert ledger.get_run(run_id).stop_status == "not_needed"
    assert script_attempts(browser) == []


class AttackerPage(BaseHTTPRequestHandler):
    """Another origin on this machine: a page whose form posts a stop to the dashboard."""

    target = ""

    def do_GET(self):
        body = (f'<form id="f" method="post" action="{self.target}"></form>'
                '<script>document.getElementById("f").submit()</script>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.integration
def test_a_cross_origin_form_in_the_browser_is_refused(browser, dashboard, ledger, work):
    run_id = "20260101-000000-csrf"
    add_run(ledger, work, run_id, host="local", stop_status="failed", stop_detail="stop failed",
            handle_json=json.dumps({"backend": "process", "runtime": "python", "versions": {"python": sys.executable}}))
    AttackerPage.target = f"{dashboard.base}/runs/{run_id}/retry-stop"
    server = ThreadingHTTPServer(("127.0.0.1", 0), AttackerPage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # Same site (127.0.0.1), another port: the browser sends the cookie, the Origin gives it away.
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/")
        wait_for(lambda: browser.current_url.endswith("/retry-stop"), 20, "the attacker's form to post")
        assert "refused" in browser.page_source
    finally:
        server.shutdown()
    time.sleep(1)
    assert ledger.get_run(run_id).stop_status == "failed"


@pytest.mark.integration
def test_the_report_is_made_from_the_page_and_its_figures_show(browser, dashboard, ledger, work):
    run_id = "20260101-000000-repo"
    run_dir = add_run(ledger, work, run_id, model="resnet18", epochs=3, stop_status="not_needed")
    (run_dir / "predictions.csv").write_text("path,true,predicted,confidence\n" + "".join(
        f"val/{c}/{i}.jpg,{c},{c if i % 4 else ('dog' if c == 'cat' else 'cat')},0.9\n" for c in ("cat", "dog") for i in range(12)))
    (run_dir / "summary.json").write_text(json.dumps({"run_id": run_id, "model": "resnet18", "classes": ["cat", "dog"]}))
    browser.get(f"{dashboard.base}/runs/{run_id}")
    assert not browser.find_elements("css selector", ".figures img")
    browser.find_element("css selector", 'button[data-action="report"]').click()
    browser.find_element("id", "confirm-yes").click()
    # Done, the page reloads to show the figures, with the action's result kept.
    wait_for(lambda: browser.find_elements("css selector", ".figures img"), 120, "the report's figures on the page")
    assert "report written to" in text_of(browser, "#action-result")
    assert (run_dir / "report" / "report.md").is_file()
    loaded = wait_for(lambda: browser.execute_script(
        "const imgs = [...document.querySelectorAll('.figures img')]; "
        "return imgs.length && imgs.every((i) => i.complete && i.naturalWidth > 0) && imgs.length"), 20, "the figures to load")
    assert loaded >= 3  # curves, confusion matrix, per-class scores
    assert "report/report.md" in text_of(browser, "#files")
    browser.save_screenshot(str(SCREENSHOTS / "report.png"))


# Live, on the test bed's SSH host --------------------------------------------------------------------

FAST = ["--host", "t4-box", "--image-size", "32", "--batch-size", "8", "--workers", "0", "--weights", "none"]


def chart_points(driver) -> int:
    return driver.execute_script("const c = document.getElementById('accuracy-chart'); "
                                 "return c.data && c.data.length ? c.data[0].x.length : 0;")


@pytest.mark.integration
def test_live_a_followed_run_gains_points_and_the_stop_button_stops_a_run(ssh_host, dataset, chromium):
    board = Dashboard(ssh_host.work, env=ssh_host.cli.env)
    try:
        chromium.delete_all_cookies()
        chromium.get(board.url)
        # A real train, followed by `gpu-run train` to its end: its curve grows on the page.
        follow = subprocess.Popen([sys.executable, "-m", "gpu_run.cli", "train", *FAST, "--epochs", "4",
                                   "--data", str(dataset)], cwd=ssh_host.work, env=ssh_host.cli.env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        from gpu_run.paths import ledger_path

        ledger = Ledger(ledger_path())
        run_id = wait_for(lambda: next((r.run_id for r in ledger.list_runs()), None), 120, "the run in the ledger")
        chromium.get(f"{board.base}/runs/{run_id}")
        first = wait_for(lambda: chart_points(chromium), 300, "the first epoch on the page")
        wait_for(lambda: chart_points(chromium) > first, 120, "the curve to gain a point while it trains")
        assert follow.wait(300) == 0, follow.stderr.read()
        wait_for(lambda: text_of(chromium, "#run-status") == "succeeded", 30, "the page to show the end")
        assert chart_points(chromium) == 4
        chromium.save_screenshot(str(SCREENSHOTS / "live-run.png"))

        # A detached run, stopped from the page: last.pth saved, outputs pulled, the machine stopped.
        ssh_host.start_machine()
        second = ssh_host.cli.json("train", *FAST, "--image-size", "64", "--epochs", "40", "--detach",
                                   "--data", str(dataset))["run_id"]
        wait_for((ssh_host.remote_run_dir(second) / "out" / "metrics.jsonl").exists, 300, "its first epoch on the host")
        chromium.get(f"{board.base}/runs/{second}")
        chromium.find_element("css selector", 'button[data-action="stop"]').click()
        chromium.find_element("id", "confirm-yes").click()
        wait_for(lambda: "done" in text_of(chromium, "#action-result") or "failed" in text_of(chromium, "#action-result"),
                 300, "the stop's result")
        assert "run stopped; machine stopped" in text_of(chromium, "#action-result")
        run = ledger.get_run(second)
        assert run.status == "stopped" and run.stop_status == "stopped" and ssh_host.stop_marker.exists()
        assert (Path(run.run_dir) / "checkpoints" / "last.pth").is_file()
        wait_for(lambda: text_of(chromium, "#run-status") == "stopped" and chart_points(chromium) >= 1, 30,
                 "the page to show the stopped run and its pulled epochs")
        ledger.close()
    finally:
        board.stop()
