"""Helpers for the server tests: a real uvicorn server on a loopback port, and an engine whose output
can be scripted (random tiny weights never call a tool by themselves).

ScriptedEngine is the real Engine (tokenizer, template, KV cache); only generate() may replay a queued
K2-grammar string, token by token through the real run_chat / parser path, instead of sampling.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

import uvicorn

from hybrid.checkpoint.reader import Checkpoint
from hybrid.runtime.engine import Engine
from hybrid.runtime.token_loop import Step
from hybrid.experts.reference import ReferenceExperts

API_KEY = "test-key"
HOLD_S = 30.0  # bounded waits: a broken test fails instead of hanging

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL_WEATHER = ("<think>I should check the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>"
                'functions.get_weather:0<|tool_call_argument_begin|>{"city":"Paris"}<|tool_call_end|>'
                "<|tool_calls_section_end|><|im_end|>")
ANSWER = "<think>The tool says sunny.</think>It is sunny in Paris.<|im_end|>"


class ScriptedEngine(Engine):
    """generate() replays scripts queued with play() (one per call), else runs the model as usual.

    hold: after its tokens, the script waits for this event, then repeats a filler token until
    max_new_tokens, as if the model were in the middle of a long answer. fail: raised after its tokens.
    """

    def __init__(self, ckpt: Checkpoint, context: int):
        super().__init__(ckpt, ReferenceExperts(ckpt), context=context)
        self.scripts: deque[tuple[list[int], threading.Event | None, Exception | None]] = deque()
        self.prompts: list[list[int]] = []  # every prompt generate() was given
        self.last_steps = 0  # steps the last scripted generation yielded before it was closed
        # set when the script queued last begins; cleared by play(), never by a generator's end: a
        # finished generator is finalized when its consumer lets go of it, which may be after the
        # next script began (clearing it then made the next wait miss that start)
        self.started = threading.Event()
        self.closed = threading.Event()  # set when a scripted generation's generator is closed

    def play(self, text: str, hold: threading.Event | None = None, fail: Exception | None = None) -> None:
        self.started.clear()
        self.scripts.append((self.tokenizer.encode(text, allow_special=True), hold, fail))

    def generate(self, token_ids, max_new_tokens, temperature=1.0, seed=None, *, sampling=None, sampler=None,
                 stop_ids=frozenset(), should_stop=None):
        self.prompts.append(list(token_ids))
        if not self.scripts:
            yield from super().generate(token_ids, max_new_tokens, temperature, seed, sampling=sampling,
                                        sampler=sampler, stop_ids=stop_ids, should_stop=should_stop)
            return
        ids, hold, fail = self.scripts.popleft()
        filler = self.tokenizer.encode("x")[0]
        self.closed.clear()
        self.last_steps = 0
        self.started.set()
        try:
            for i in range(max_new_tokens):
                if i == len(ids) and fail is not None:
                    raise fail
                if i == len(ids) and hold is not None:
                    assert hold.wait(HOLD_S), "the test never released the scripted generation"
                tok = ids[i] if i < len(ids) else filler
                finish = "stop" if tok in stop_ids else ("length" if i + 1 == max_new_tokens else None)
                self.last_steps = i + 1
                yield Step(tok, i, len(token_ids), 0.0, finish)
                if finish:
                    return
        finally:
            self.closed.set()

    def decode_prompt(self, index: int = -1) -> str:
        return self.tokenizer.decode(self.prompts[index])


def raw_post(base_url: str, path: str, body: dict) -> socket.socket:
    """Send one POST over a bare socket and return the socket (closing it = the client leaving)."""
    host, port = base_url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@contextmanager
def running(app) -> Iterator[str]:
    """Serve app with uvicorn on 127.0.0.1 (a free port) in a thread; yield its base URL; stop it.
    The socket listens before the thread starts, so clients may connect at once (they wait in the backlog)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(HOLD_S)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not shut down"


class Submissions(logging.Handler):
    """The server's log lines; wait_for(n) blocks until n requests were queued, wait_for(n, text)
    until n lines held text."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[str] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        with self._cond:
            self.records.append(message)
            self._cond.notify_all()

    def positions(self) -> list[int]:
        return [int(m.split("queue position ")[1].split()[0]) for m in self.records if "queue position" in m]

    def wait_for(self, n: int, text: str = "queue position") -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: sum(text in m for m in self.records) >= n, HOLD_S)


@contextmanager
def watching_submissions() -> Iterator[Submissions]:
    logger = logging.getLogger("hybrid")
    handler, level = Submissions(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
