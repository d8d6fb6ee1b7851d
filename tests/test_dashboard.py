"""What a person sees: a real TensorBoard server over a demo run, and a headless-Chromium screenshot."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lightning_debug.dashboard import LAYOUT
from lightning_debug.demo import run_demo

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def tensorboard_server(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("demo")
    run_demo(["init_too_large"], logdir)
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--load_fast=false",
            "--reload_interval=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                runs = get_json(f"{base}/data/runs")
                if runs and get_json(f"{base}/data/plugin/scalars/tags"):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"TensorBoard did not come up: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
                )
            time.sleep(0.5)
        yield base, logdir
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tensorboard_serves_the_scalars_text_report_and_dashboard_layout(tensorboard_server):
    base, _ = tensorboard_server
    scalar_tags = {tag for tags in get_json(f"{base}/data/plugin/scalars/tags").values() for tag in tags}
    assert {"init_loss/measured", "init_loss/expected"} <= scalar_tags
    text_tags = {tag for tags in get_json(f"{base}/data/plugin/text/tags").values() for tag in tags}
    assert {"lightning_debug/findings/text_summary", "lightning_debug/report/text_summary"} <= text_tags
    layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
    assert {category["title"] for category in layout["category"]} == set(LAYOUT)


def test_headless_chromium_screenshot_of_the_dashboard(tensorboard_server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian package `chromium`): no screenshot")
    base, _ = tensorboard_server
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1400,1000",
            "--virtual-time-budget=15000",
            f"--screenshot={shot}",
            f"{base}/#custom_scalars",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
