"""`openk2 serve` as a user runs it: a subprocess, a banner, SIGTERM, exit codes."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "serve"))

from serve_helpers import HELLO_A, HELLO_Q, tiny_tool_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_serve_banner_request_and_sigterm():
    ckpt = tiny_tool_model()
    proc = subprocess.Popen(
        [sys.executable, "-m", "openk2.cli", "serve", str(ckpt), "--port", "0", "--threads", "1", "--model-name", "tiny"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        banner = proc.stdout.readline()
        assert banner.startswith("openk2 serve: tiny (k2 format, chat template k2-instruct-0905, from the checkpoint) "
                                 "on http://127.0.0.1:"), banner + proc.stderr.read()
        url = banner.split(" on ")[1].split(" ")[0]
        assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny"
        r = httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": HELLO_Q, "temperature": 0}, timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == HELLO_A
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "openk2 serve: stopped" in err


def test_serve_missing_checkpoint_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "serve", str(tmp_path / "nope")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"openk2 serve: error: {tmp_path / 'nope'}: not a checkpoint directory, a .gguf file, or 'smollm2'"]


def test_serve_bad_chat_template_is_a_one_line_error():
    r = subprocess.run([sys.executable, "-m", "openk2.cli", "serve", str(tiny_tool_model()), "--chat-template", "chatml"],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "openk2 serve: error: --chat-template: chat template 'chatml': not one of k2-instruct, k2-instruct-0905, "
        "a .jinja file or a directory"]
