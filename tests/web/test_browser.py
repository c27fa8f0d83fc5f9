"""A real browser follows the links of a sent email against `digest serve`."""

from __future__ import annotations

import email
import email.policy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

CHROMIUM = os.environ.get("DIGEST_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A demo's database and outbox, with `digest serve` running over them."""
    from digest.sources.folder import SAMPLE_DIR

    port = free_port()
    (tmp_path / "config.yaml").write_text(f"""
newsletter: {{public_url: "http://127.0.0.1:{port}"}}
database: {{url: "sqlite:///{tmp_path / 'd.db'}"}}
sources: [{{name: sample, type: folder, path: "{SAMPLE_DIR}"}}]
delivery: {{provider: outbox, outbox_dir: out}}
digest: {{approval: {{required: false}}, collect_schedule: "0 0 1 1 *", send_schedule: "0 0 1 1 *"}}
web: {{listen: "127.0.0.1:{port}"}}
""")
    env = {**os.environ, "DIGEST_CONFIG": str(tmp_path / "config.yaml")}
    run = [sys.executable, "-m", "digest"]
    subprocess.run([*run, "subscribers", "add", "ann@example.com", "--name", "Ann"], env=env, check=True,
                   capture_output=True)
    subprocess.run([*run, "run"], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*run, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"digest serve did not start: {proc.communicate()[1]}")
    yield tmp_path, port, proc
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_links_in_a_sent_email_work_in_a_browser(served) -> None:  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium, or set DIGEST_TEST_CHROMIUM")
    from playwright.sync_api import sync_playwright

    tmp_path, port, _proc = served
    (eml,) = (tmp_path / "out").rglob("1-*.eml")
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    html = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
    unsubscribe = re.search(r'href="(http://127\.0\.0\.1:\d+/u/[^"]+)"', html)
    preferences = re.search(r'href="(http://127\.0\.0\.1:\d+/preferences/[^"]+)"', html)
    assert unsubscribe and preferences
    assert msg["List-Unsubscribe"] == f"<{unsubscribe.group(1)}>"

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        page = browser.new_page()
        page.goto(preferences.group(1))
        assert "ann@example.com" in page.content()
        page.goto(unsubscribe.group(1))
        assert page.get_by_role("heading").inner_text().startswith("Unsubscribe from")
        page.get_by_role("button", name="Unsubscribe").click()
        page.wait_for_selector("text=You are unsubscribed")
        page.screenshot(path=str(tmp_path / "unsubscribed.png"))
        browser.close()
    listing = subprocess.run([sys.executable, "-m", "digest", "--config", str(tmp_path / "config.yaml"),
                              "subscribers", "list"], capture_output=True, text=True, check=True)
    assert "ann@example.com\tAnn\tunsubscribed" in listing.stdout


def test_one_click_post_against_the_real_server(served) -> None:  # type: ignore[no-untyped-def]
    tmp_path, port, _proc = served
    (eml,) = (tmp_path / "out").rglob("1-*.eml")
    msg = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    url = msg["List-Unsubscribe"].strip("<>")
    # What a mailbox provider sends: no cookies, no auth, just this body.
    r = requests.post(url, data="List-Unsubscribe=One-Click",
                      headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=10)
    assert r.status_code == 200
    listing = subprocess.run([sys.executable, "-m", "digest", "--config", str(tmp_path / "config.yaml"),
                              "subscribers", "list"], capture_output=True, text=True, check=True)
    assert "unsubscribed" in listing.stdout


def test_serve_stops_cleanly_on_sigterm(served) -> None:  # type: ignore[no-untyped-def]
    _tmp, _port, proc = served
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err
