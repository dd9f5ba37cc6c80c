"""The report and MLflow's UI in a real browser (headless Chromium, Debian's `chromium`; .ci/run installs
it), on a small sweep of the real trainer (reference prior, 16 px, a few steps), so that the page shows
real turntables and validation grids.

- The report page: every image loads (none broken) and its screenshot is not blank.
- `mlflow ui --app-name dreamsweep` on the sweep's store, started here on 127.0.0.1: the experiment's
  plain address opens on its runs (not MLflow's GenAI traces) and shows the sweep's parent run with its
  nested trial runs.

Set DREAMSWEEP_SCREENSHOTS=DIR to keep both screenshots (docs/ holds the ones from this test).
"""

import contextlib
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import entry_points
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from PIL import Image

from orchestrator.cli import main
from orchestrator.run.sweep import submit
from orchestrator.run.workspace import Workspace
from orchestrator.spec.spec import load_sweep_spec

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("DREAMSWEEP_REQUIRE_BROWSER"),
    reason="no chromium on PATH (apt-get install chromium; .ci/run installs it)",
)
TRIALS = 2  # run at once; with --top 1 the page shows the best beside the worst


def chromium(*args: str, tmp: Path, timeout: float = 180) -> str:
    assert CHROMIUM is not None, "chromium is required here (DREAMSWEEP_REQUIRE_BROWSER is set)"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
        f"--user-data-dir={tmp / 'chromium-profile'}", *args,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def open_page(url: str, tmp: Path, size=(1400, 1800), wait_ms: int = 5000) -> tuple[str, np.ndarray]:
    """The page's DOM once `wait_ms` of its (virtual) time has passed, and its screenshot then: one
    browser run for both."""
    path = tmp / "screenshot.png"
    dom = chromium(
        f"--window-size={size[0]},{size[1]}",
        f"--virtual-time-budget={wait_ms}",
        f"--screenshot={path}",
        "--dump-dom",
        url,
        tmp=tmp,
    )
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[:2] == (size[1], size[0])
    return dom, pixels


def keep_screenshot(pixels: np.ndarray, name: str) -> None:
    if os.environ.get("DREAMSWEEP_SCREENSHOTS"):
        Image.fromarray(pixels).save(Path(os.environ["DREAMSWEEP_SCREENSHOTS"]) / name)


def assert_not_blank(pixels: np.ndarray) -> None:
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 10 and colours > 100, (
        f"a blank screenshot (std {pixels.std():.1f}, {colours} colours)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SPEC = {
    "name": "browser",
    "kind": "search",
    "base": str(ROOT / "sweeps" / "configs" / "reference_cpu.yaml"),
    "overrides": {
        "max_steps": 4,
        "resolution": 16,
        "prior.image_size": 16,
        "prior.reference.n_views": 6,
        "camera.fixed_views": 6,  # trains at the prior's own views (sweeps/configs/reference_cpu.yaml)
        "prior.reference.uncond_prompts": ["a blue sphere", "a yellow cone"],
        "renderer.num_samples_per_ray": 16,
        "logging.log_every": 2,
        "logging.val_every": 2,  # validation grids at steps 2 and 4
        "logging.checkpoint_every": 2,
        "logging.turntable_frames": 4,
    },
    "prompts": {"items": ["a red cube", "a green torus"]},
    "search": {"space": {"guidance.eta": {"type": "float", "low": 0.0, "high": 0.5}}, "seed": 0},
    "objective": {"metric": "eval/psnr", "mode": "max"},
    "trials": TRIALS,
    "max_concurrent": 2,
    "resources": {"cpus": 1},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("ws-browser"))


@pytest.fixture(scope="module")
def mlflow_ui(workspace, tmp_path_factory):
    """`mlflow ui --app-name dreamsweep` on the sweep's store, started before the sweep runs so that its
    start (seconds of imports) overlaps the sweep's; calling it waits until it answers, returns its URL."""
    apps = {e.name for e in entry_points(group="mlflow.app")}
    assert "dreamsweep" in apps, "dreamsweep's `mlflow.app` entry point is not installed: pip install -e ."
    uri = workspace.stores_for(load_sweep_spec(SPEC)).mlflow_uri
    mlflow.MlflowClient(uri).search_experiments()  # the store's tables: made here, not by both at once
    port, log = free_port(), tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    command = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--app-name", "dreamsweep",
    ]  # fmt: skip
    # its own process group: `mlflow ui` runs its web server in a child process, stopped with it
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def started() -> str:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        return url
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow ui did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)

    yield started
    # nothing of the server's is kept: killed at once, not left seconds for its graceful shutdown
    with contextlib.suppress(ProcessLookupError):  # the whole group may be gone already
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def sweep(workspace, mlflow_ui, tmp_path_factory):
    # (mlflow_ui: asked for so that the server starts first; the test that uses it waits for it)
    spec = {
        **SPEC,
        "overrides": {**SPEC["overrides"], "prior.cache_dir": str(tmp_path_factory.mktemp("ref"))},
    }
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert submit(spec, workspace=workspace).complete == TRIALS
    finally:
        ray.shutdown()
    return workspace


@pytest.fixture
def http_root(tmp_path):
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# A page beside the report that loads it in a frame (same origin) and writes what it sees of its images;
# the frame fills the window, so that its screenshot is the report's.
HARNESS = """<!DOCTYPE html><html><body style="margin:0"><pre id="result" hidden>pending</pre>
<iframe id="report" src="report/index.html" style="border:0;display:block;width:1400px;height:1800px"></iframe>
<script>
document.getElementById("report").addEventListener("load", () => {
  const images = Array.from(document.getElementById("report").contentDocument.images);
  const check = () => {
    if (!images.every((i) => i.complete)) return setTimeout(check, 50);
    document.getElementById("result").textContent = JSON.stringify({
      images: images.length,
      broken: images.filter((i) => i.naturalWidth === 0).map((i) => i.alt),
      gifs: images.filter((i) => i.src.startsWith("data:image/gif")).length,
    });
  };
  check();
});
</script></body></html>"""


def test_every_image_of_the_report_loads_and_the_page_is_not_blank(sweep, http_root, tmp_path):
    root, url = http_root
    out = root / "report"
    assert (
        main(["report", "browser", "--top", "1", "--workspace", str(sweep.root), "--output", str(out)]) == 0
    )
    (root / "harness.html").write_text(HARNESS)
    dom, pixels = open_page(f"{url}/harness.html", tmp_path, wait_ms=20000)
    seen = json.loads(html.unescape(re.search(r'<pre id="result"[^>]*>(.*?)</pre>', dom, re.S).group(1)))
    # the best and the worst: a turntable per prompt each (GIFs), 2 validation grids each, and 4 plots
    assert seen["broken"] == [] and seen["gifs"] == 2 * 2 and seen["images"] >= 2 * 2 + 2 * 2 * 2 + 4
    assert_not_blank(pixels)
    keep_screenshot(pixels, "report.png")


def test_mlflow_ui_opens_the_experiment_on_its_runs_a_parent_with_nested_trial_runs(
    sweep, mlflow_ui, tmp_path
):
    record = sweep.record("browser")
    client = mlflow.MlflowClient(record.stores.mlflow_uri)
    runs = client.search_runs([record.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == record.parent_run_id]
    assert len(runs) == 1 + TRIALS and len(children) == TRIALS
    # the plain address, in a fresh browser: a plain `mlflow ui` would open it on its GenAI traces
    # ("Traces 0", "No data available"); dreamsweep's app opens it on its runs
    page = f"{mlflow_ui()}/#/experiments/{record.experiment_id}"
    for _ in range(3):  # the server's first requests can outlast the browser's wait: ask again
        dom, pixels = open_page(page, tmp_path, size=(1400, 900), wait_ms=30000)
        text = " ".join(re.sub(r"<[^>]+>", " ", dom).split())
        if "matching runs" in text:
            break
    assert f"{1 + TRIALS} matching runs" in text  # the parent and its children
    # the parent's row, named after the sweep, with the expander its nested children sit under
    assert f'href="#/experiments/{record.experiment_id}/runs/{record.parent_run_id}"' in dom
    assert "No data available" not in text
    assert_not_blank(pixels)
    keep_screenshot(pixels, "mlflow-ui.png")
