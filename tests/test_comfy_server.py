"""The pack in a real ComfyUI server, driven over HTTP as users and front ends drive it.

``python main.py --cpu --listen 127.0.0.1 --port N`` runs in a throw-away tree (symlinks to the engine's
files, its own ``main.py`` copy, so the engine folder is never written to and the wheel's
``extra_model_paths.yaml`` is left out), with the pack in ``custom_nodes/`` of a temp base directory.
``/object_info`` must list the hasten nodes with their descriptions and tooltips; ``/prompt`` runs the
embedded digit model with EasyCache (hasten) and the Run Stats node; ``/history`` and ``/view`` give
back an image the digit classifier reads as the prompted digit, and the run's statistics.

Skips (outside CI) when the server cannot start here, saying why; in CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

import comfy_env as ce

HASTEN_NODES = {
    "HastenEasyCache": "EasyCache (hasten)", "HastenAdaptiveGuidance": "Adaptive Guidance (hasten)",
    "HastenRunStats": "Run Stats (hasten)", "HastenEmbeddedLoader": "Load Embedded Digit Model (hasten)",
    "HastenDigitPrompt": "Digit Prompt (hasten)", "HastenEmptyDigitLatent": "Empty Digit Latent (hasten)",
    "HastenDecodeDigits": "Decode Digits (hasten)",
}
START_TIMEOUT = float(os.environ.get("HASTEN_COMFY_SERVER_TIMEOUT", "300"))
DIGIT = 0  # seed 0, batch of one: reads as prompted (a "3" at this seed reads as 9 to the classifier)

# Runs in the server process: stand-ins for torchvision/torchaudio (as in-process tests), then main.py.
_LAUNCHER = """
import runpy, sys
from hasten.bench.comfy_engine import _install_standins
_install_standins()
sys.argv = ["main.py", *sys.argv[1:]]
sys.path.insert(0, ".")
runpy.run_path("main.py", run_name="__main__")
"""


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"ComfyUI server test cannot run: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(root: Path, dest: Path) -> Path:
    """A tree of symlinks to the engine's entries, with its own main.py and no extra_model_paths.yaml."""
    dest.mkdir()
    for entry in root.iterdir():
        if entry.name in ("extra_model_paths.yaml", "custom_nodes", "__pycache__", "user", "output", "input",
                          "temp", "models"):
            continue
        if entry.name == "main.py":
            shutil.copy(entry, dest / "main.py")
        else:
            (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    return dest


def _frontend_standin(site: Path) -> None:
    """A stand-in ``comfyui_frontend_package`` (static index.html) when the real one is not installed."""
    pkg = site / "comfyui_frontend_package"
    (pkg / "static").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "static" / "index.html").write_text("<html><body>hasten test stand-in front end</body></html>")


class Server:
    def __init__(self, url: str, proc: subprocess.Popen, log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log

    def get(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def get_json(self, path: str) -> dict:
        return json.loads(self.get(path))

    def post_json(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path} -> {e.code}: {e.read().decode()[:2000]}") from e

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    reason = ce.skip_reason()
    if reason:
        _skip_or_fail(reason)
    try:
        import aiohttp  # noqa: F401  (ComfyUI's server)
    except ImportError:
        _skip_or_fail("aiohttp is not installed (ComfyUI's web server needs it)")
    root = ce.comfyui_root()
    tmp = tmp_path_factory.mktemp("comfy-server")
    tree = _tree(root, tmp / "tree")
    base = tmp / "base"
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "hasten").symlink_to(ce.REPO_ROOT, target_is_directory=True)
    site = tmp / "site"
    site.mkdir()
    try:
        import comfyui_frontend_package  # noqa: F401
    except ImportError:
        _frontend_standin(site)
    port = _free_port()
    log = tmp / "server.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(site)) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, "--cpu", "--listen", "127.0.0.1", "--port",
                                 str(port), "--base-directory", str(base), "--disable-auto-launch"],
                                cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                _skip_or_fail(f"the ComfyUI server exited with {proc.returncode} at start:\n{srv.log_tail()}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                _skip_or_fail(f"the ComfyUI server did not answer within {START_TIMEOUT:.0f} s:\n{srv.log_tail()}")
            time.sleep(2)
        yield srv
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (started above)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_object_info_lists_the_nodes_with_descriptions_and_tooltips(server: Server) -> None:
    info = server.get_json("/object_info")
    for node_id, name in HASTEN_NODES.items():
        assert node_id in info, f"{node_id} missing; server log:\n{server.log_tail()}"
        node = info[node_id]
        assert node["display_name"] == name
        assert node["description"], node_id
        assert node["category"].startswith("hasten")
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), (node_id, inp)
        assert all(node.get("output_tooltips") or [None]), node_id
    assert "HastenEasyCache" in info and "EasyCache" in info  # ours beside the built-in, distinct ids


def _graph(with_cache: bool) -> dict:
    model = ["5", 0] if with_cache else ["1", 0]
    g: dict = {
        "1": {"class_type": "HastenEmbeddedLoader", "inputs": {"weight_dtype": "float32"}},
        "2": {"class_type": "HastenDigitPrompt", "inputs": {"text": f"digit {DIGIT}"}},
        "3": {"class_type": "HastenDigitPrompt", "inputs": {"text": ""}},
        "4": {"class_type": "HastenEmptyDigitLatent", "inputs": {"size": 32, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "seed": 0, "steps": 20, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "7": {"class_type": "HastenDecodeDigits", "inputs": {"samples": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0],
                                                    "filename_prefix": "cached" if with_cache else "base"}},
    }
    if with_cache:
        g["5"] = {"class_type": "HastenEasyCache", "inputs": {"model": ["1", 0], "reuse_threshold": 0.2,
                                                              "start_percent": 0.2, "end_percent": 1.0,
                                                              "max_consecutive_reuse": 4, "verbose": False}}
        g["9"] = {"class_type": "HastenRunStats", "inputs": {"model": ["5", 0], "latent": ["6", 0]}}
    return g


def _run(server: Server, graph: dict, timeout: float = 300) -> dict:
    prompt_id = server.post_json("/prompt", {"prompt": graph, "client_id": "hasten-test"})["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hist = server.get_json(f"/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            entry = hist[prompt_id]
            assert entry["status"]["status_str"] == "success", (entry["status"], server.log_tail())
            return entry["outputs"]
        time.sleep(1)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s:\n{server.log_tail()}")


def _image(server: Server, outputs: dict) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    (img,) = outputs["8"]["images"]
    query = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img["subfolder"], "type": img["type"]})
    arr = np.asarray(Image.open(io.BytesIO(server.get(f"/view?{query}"))).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def test_prompt_history_view_gives_the_prompted_digit_with_easycache(server: Server) -> None:
    from hasten import metrics

    base = _image(server, _run(server, _graph(False)))
    outputs = _run(server, _graph(True))
    cached = _image(server, outputs)
    assert cached.shape == base.shape == (1, 3, 32, 32)
    assert metrics.read_digits(base) == [DIGIT] and metrics.read_digits(cached) == [DIGIT]
    assert metrics.psnr(cached, base) > 20
    (stats,) = outputs["9"]["text"]
    assert stats.startswith("EasyCache (hasten): ") and "/40 branch forwards computed" in stats, stats
    computed = int(stats.split(": ")[1].split("/")[0])
    assert computed < 40, stats
    assert "EasyCache (hasten): " in server.log_tail(20000)


def test_a_bad_graph_is_rejected_with_the_node_named(server: Server) -> None:
    bad = _graph(True)
    bad["5"]["inputs"]["reuse_threshold"] = -1.0
    req = urllib.request.Request(server.url + "/prompt", data=json.dumps({"prompt": bad}).encode(),
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    body = json.loads(err.value.read())
    assert "5" in body.get("node_errors", {}), body
