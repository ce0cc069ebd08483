"""SIGTERM and SIGINT end a busy server gracefully: the real `serve()` in a subprocess, one streamed
answer running and requests of both APIs queued (plain and streamed) when the signal comes. The running
stream ends with its API's error event, each queued request gets a JSON 503 in its API's error style, and
the process exits 0 within a few seconds, with no traceback in its log."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server_harness import HOLD_S

EXIT_S = 15.0  # the server's grace period (5 s) plus a token and interpreter exit, with slack for a loaded machine


class ServerProcess:
    """`serve()` of the tiny checkpoint in a subprocess on a free loopback port; its merged output is read
    by a thread, so a test can wait for a line."""

    def __init__(self, model: str, **options):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = ", ".join(f"{k}={v!r}" for k, v in {"port": self.port, "backend": "reference", "context": 1024,
                                                      "model_name": "m", **options}.items())
        code = f"from hybrid.serve.app import serve; serve({model!r}, {args})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        assert self.wait_for("Uvicorn running on"), self.log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        with self._cond:
            return "".join(self.lines)

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<eof>")
            self._cond.notify_all()

    def wait_for(self, text: str, n: int = 1) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(text in ln for ln in self.lines) >= n or "<eof>" in self.lines,
                                       HOLD_S) and sum(text in ln for ln in self.lines) >= n

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(HOLD_S)
        self._reader.join(HOLD_S)


def openai_body(stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 900,
            "temperature": 0, "stream": stream}


def anthropic_body(stream: bool) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 900,
            "temperature": 0, "stream": stream}


def post(url: str, path: str, body: dict) -> tuple[int, str, list[str]]:
    """(status, content type, body lines) of one request, read to its end."""
    with httpx.stream("POST", url + path, json=body, timeout=HOLD_S) as r:
        return r.status_code, r.headers.get("content-type", ""), list(r.iter_lines())


def running_stream(url: str, path: str, body: dict, started: threading.Event) -> list[str]:
    """A streamed request's lines; `started` is set once the answer's first text came."""
    lines = []
    with httpx.stream("POST", url + path, json=body, timeout=HOLD_S) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if '"reasoning_content"' in line or '"content": "' in line or "_delta" in line:
                started.set()
    return lines


@pytest.mark.parametrize("api, sig", [("openai", signal.SIGTERM), ("anthropic", signal.SIGINT)])
def test_a_signal_ends_the_running_stream_and_refuses_the_queue_then_exits_0(tiny_path, api, sig):
    server = ServerProcess(str(tiny_path), keepalive_s=60.0)
    path = "/v1/chat/completions" if api == "openai" else "/v1/messages"
    queued = [("/v1/chat/completions", openai_body(False)), ("/v1/chat/completions", openai_body(True)),
              ("/v1/messages", anthropic_body(False)), ("/v1/messages", anthropic_body(True))]
    try:
        with ThreadPoolExecutor(len(queued) + 1) as pool:
            started = threading.Event()
            body = openai_body(True) if api == "openai" else anthropic_body(True)
            running = pool.submit(running_stream, server.url, path, body, started)
            assert started.wait(HOLD_S), server.log
            waiting = [pool.submit(post, server.url, p, b) for p, b in queued]
            assert server.wait_for("queue position", 1 + len(queued)), server.log
            server.proc.send_signal(sig)
            assert server.proc.wait(EXIT_S) == 0, server.log
            stream = running.result(HOLD_S)
            answers = [f.result(HOLD_S) for f in waiting]
    finally:
        server.close()

    data = [ln.removeprefix("data: ") for ln in stream if ln.startswith("data: ")]
    if api == "openai":  # an error chunk, then [DONE]: the SDK raises APIError with the message
        assert data[-1] == "[DONE]", stream[-6:]
        error = json.loads(data[-2])["error"]
        assert "shutting down" in error["message"] and error["type"] == "server_error"
        assert error["code"] == "shutting_down"
    else:  # Anthropic's error event: the SDK raises with its message
        assert [ln for ln in stream if ln.startswith("event: ")][-1] == "event: error", stream[-6:]
        event = json.loads(data[-1])
        assert event["type"] == "error" and "shutting down" in event["error"]["message"]
        assert event["error"]["type"] == "overloaded_error"
    for (p, b), (status, kind, lines) in zip(queued, answers):
        assert status == 503 and kind == "application/json", (p, b["stream"], status, lines[:3])
        err = json.loads("".join(lines))
        if p == "/v1/messages":
            assert err["type"] == "error" and err["error"]["type"] == "overloaded_error"
            assert "shutting down" in err["error"]["message"]
        else:
            assert err["error"]["code"] == "shutting_down" and "shutting down" in err["error"]["message"]
    log = server.log
    assert "Traceback" not in log and "CancelledError" not in log and "Cancel " not in log, log
    assert "shutting down: 5 request(s) ended" in log, log
