"""Soak the server: start `kimi-hybrid serve` on loopback (the tiny model by default), drive it with many
clients for a bounded time with a mix of ordinary, streamed, abandoned, oversized and malformed requests
of both APIs, then SIGTERM it while requests are still in flight.

Reports the requests, their outcomes by kind, latency, the server's peak RSS, how it exited, and whether
anything was lost: every request must end in an answer, a well-formed error in its API's style (an HTTP
error body, or an error event in a stream), or a disconnect the client chose. Exit status 1 if anything
was lost or the server did not exit 0.

    python scripts/soak.py --seconds 60          # a table
    python scripts/soak.py --seconds 10 --json   # one JSON object
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil

MODEL = "soak"
MAX_BODY = 1 << 20  # the server's --max-body-bytes here, so oversized bodies are cheap to send
KINDS = {"openai": 5, "openai_stream": 5, "anthropic": 3, "anthropic_stream": 3, "abandon": 2, "too_long": 2,
         "too_big": 1, "malformed": 2}  # relative weights


@dataclass
class Tally:
    """Every request's outcome, latency and kind, from all client threads."""
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome) -> count
    latency: dict = field(default_factory=dict)  # outcome class ('answer' / 'error') -> [seconds]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, seconds: float) -> None:
        cls = "answer" if outcome == "ok" else "error" if outcome[0].isdigit() or outcome.startswith("stream") else None
        with self.lock:
            self.outcomes[kind, outcome] += 1
            if cls:
                self.latency.setdefault(cls, []).append(seconds)


def api_error(path: str, status: int, body: bytes) -> str:
    """'STATUS code' for an error body in the style of the path's API, else 'LOST: ...'."""
    try:
        data = json.loads(body)
    except ValueError:
        return f"LOST: {status} with a body that is not JSON: {body[:80]!r}"
    if not isinstance(data, dict):
        return f"LOST: {status} with a body that is not a JSON object: {body[:80]!r}"
    if path.startswith("/v1/messages"):
        ok = data.get("type") == "error" and isinstance(data.get("error"), dict) and data["error"].get("message")
        return f"{status} {data['error']['type']}" if ok else f"LOST: {status} not in Anthropic's style: {data}"
    err = data.get("error")
    ok = isinstance(err, dict) and err.get("message")
    return f"{status} {err.get('code') or err.get('type')}" if ok else f"LOST: {status} not in OpenAI's style: {data}"


def read_stream(path: str, r: httpx.Response, abandon: bool) -> str:
    """How a 200 stream ended: 'ok', 'stream error: ...', 'client disconnect', or 'LOST: ...'. OpenAI's
    ends with `data: [DONE]` (after an error chunk if it failed); Anthropic's with message_stop or error."""
    anthropic = path.startswith("/v1/messages")
    event, last, error = None, None, None
    for line in r.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        if not line.startswith("data: "):
            continue  # event names, keep-alive comments, blank separators
        if abandon:
            return "client disconnect"  # the client leaves after the first event
        data = line[6:]
        last = event if anthropic else data
        if data != "[DONE]" and (anthropic and event == "error" or not anthropic and '"error"' in data[:10]):
            error = json.loads(data)["error"]
    if last not in (("message_stop", "error") if anthropic else ("[DONE]",)):
        return f"LOST: the stream ended after {str(last)[:60]!r}"
    return f"stream error: {error.get('code') or error.get('type')}" if error is not None else "ok"


def well_formed_answer(path: str, body: bytes) -> str:
    data = json.loads(body)
    if path.startswith("/v1/messages"):
        return "ok" if data.get("type") == "message" and data.get("stop_reason") else f"LOST: odd answer {data}"
    return "ok" if data.get("choices") and data["choices"][0].get("finish_reason") else f"LOST: odd answer {data}"


def request_for(kind: str, rng: random.Random, context: int) -> tuple[str, bytes, dict, bool]:
    """(path, body, headers, stream) for one request of this kind."""
    anthropic = kind.startswith("anthropic") or (kind in ("abandon", "too_long", "malformed") and rng.random() < 0.5)
    path = "/v1/messages" if anthropic else "/v1/chat/completions"
    stream = kind.endswith("_stream") or kind == "abandon"
    text = " ".join(rng.choice(["tell", "me", "about", "the", "sea", "and", "stars", "why"]) for _ in range(12))
    if kind == "too_long":  # over the context in tokens: a few times it, or far past it (refused unread)
        text = "word " * (context * rng.choice([3, 100]))
    body: dict = {"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": rng.randint(4, 24),
                  "temperature": 0.8, "stream": stream}
    headers = {"content-type": "application/json"}
    if kind == "too_big":
        body["messages"][0]["content"] = "x" * (MAX_BODY + 1000)
    if kind == "malformed":
        return path, *malformed(rng, body), False
    return path, json.dumps(body).encode(), headers, stream


def malformed(rng: random.Random, body: dict) -> tuple[bytes, dict]:
    choice = rng.randrange(6)
    headers = {"content-type": "application/json"}
    if choice == 0:
        return b'{"model": "soak", "messages": [', headers
    if choice == 1:
        return json.dumps({"model": MODEL}).encode(), headers
    if choice == 2:
        return json.dumps({**body, "max_tokens": "5"}).encode(), headers
    if choice == 3:
        return json.dumps({**body, "model": "not-this-one"}).encode(), headers
    if choice == 4:
        return json.dumps({**body, "messages": [{"role": "robot", "content": "hi"}]}).encode(), headers
    return json.dumps(body).encode(), {"content-type": "text/plain"}


def one_request(client: httpx.Client, kind: str, rng: random.Random, context: int) -> tuple[str, float]:
    """Send one request; (outcome, retry-after seconds or 0)."""
    path, body, headers, stream = request_for(kind, rng, context)
    with client.stream("POST", path, content=body, headers=headers) as r:
        if r.status_code != 200:
            outcome = api_error(path, r.status_code, r.read())
            if r.status_code in (429, 503) and "retry-after" in r.headers:
                return outcome, float(r.headers["retry-after"])
            if r.status_code == 429:
                return "LOST: 429 without Retry-After", 0.0
            return outcome, 0.0
        if stream:
            return read_stream(path, r, abandon=kind == "abandon"), 0.0
        return well_formed_answer(path, r.read()), 0.0


def client_loop(url: str, seed: int, context: int, tally: Tally, stopping: threading.Event,
                signalled: threading.Event) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    with httpx.Client(base_url=url, timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        while not stopping.is_set():
            kind = rng.choices(kinds, weights)[0]
            t0 = time.perf_counter()
            try:
                outcome, retry_after = one_request(client, kind, rng, context)
            except httpx.ConnectError:
                outcome, retry_after = ("not accepted (server stopped)" if signalled.is_set() else "LOST: cannot connect"), 0
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:  # a broken or odd answer
                outcome, retry_after = f"LOST: {type(exc).__name__}: {exc}", 0
            tally.add(kind, outcome, time.perf_counter() - t0)
            if retry_after:
                stopping.wait(min(retry_after, 2.0) * rng.uniform(0.5, 1.0))  # the SDKs honour it; keep the load up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, context: int, backend: str | None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hybrid.cli", "serve", "-m", model, "--port", str(port), "--context", str(context),
           "--model-name", MODEL, "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"]
    if backend:
        cmd += ["--backend", backend]
    log = tempfile.NamedTemporaryFile("w", prefix="soak-server-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
            return proc, log.name
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"the server did not start; see {log.name}")


def sample_rss(pid: int, peak: list[int], done: threading.Event) -> None:
    proc = psutil.Process(pid)
    while not done.wait(0.2):
        try:
            peak[0] = max(peak[0], proc.memory_info().rss)
        except psutil.Error:
            return


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def soak(args: argparse.Namespace) -> dict:
    port = free_port()
    proc, log = start_server(args.model, port, args.context, args.backend)
    try:
        return drive(args, port, proc, log)
    finally:
        if proc.poll() is None:
            proc.kill()


def drive(args: argparse.Namespace, port: int, proc: subprocess.Popen, log: str) -> dict:
    tally, stopping, signalled, sampled = Tally(), threading.Event(), threading.Event(), threading.Event()
    peak = [psutil.Process(proc.pid).memory_info().rss]
    sampler = threading.Thread(target=sample_rss, args=(proc.pid, peak, sampled), daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client_loop, args=(f"http://127.0.0.1:{port}", args.seed + i, args.context,
                                                          tally, stopping, signalled), daemon=True)
               for i in range(args.clients)]
    t_start = time.monotonic()
    for c in clients:
        c.start()
    stopping.wait(args.seconds)
    stopping.set()  # no new requests; those in flight meet the signal
    signalled.set()
    proc.send_signal(signal.SIGTERM)
    t_sig = time.monotonic()
    try:
        code = proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "killed after 60 s"
    exit_s = time.monotonic() - t_sig
    for c in clients:
        c.join(60)
    sampled.set()
    return report(tally, args, peak[0], code, exit_s, time.monotonic() - t_start, log,
                  hung=sum(c.is_alive() for c in clients))


def report(tally: Tally, args: argparse.Namespace, peak_rss: int, code: object, exit_s: float, wall_s: float,
           log: str, hung: int) -> dict:
    by_outcome: Counter = Counter()
    for (_, outcome), n in tally.outcomes.items():
        by_outcome[outcome] += n
    lost = sum(n for o, n in by_outcome.items() if o.startswith("LOST")) + hung
    lat = {cls: {"p50_s": percentile(v, 0.5), "p99_s": percentile(v, 0.99), "n": len(v)}
           for cls, v in sorted(tally.latency.items())}
    with open(log) as f:
        text = f.read()
    return {"model": args.model, "clients": args.clients, "seconds": args.seconds, "wall_s": round(wall_s, 1),
            "requests": sum(by_outcome.values()), "outcomes": dict(by_outcome.most_common()),
            "by_kind": {f"{k} -> {o}": n for (k, o), n in sorted(tally.outcomes.items())},
            "latency": lat, "server_peak_rss_mb": round(peak_rss / 1e6, 1), "server_exit": code,
            "server_exit_s": round(exit_s, 2), "server_log": log, "tracebacks_in_server_log": text.count("Traceback"),
            "clients_still_waiting": hung, "lost": lost}


def print_table(r: dict) -> None:
    print(f"soak: {r['clients']} clients for {r['seconds']} s against {r['model']} ({r['wall_s']} s in all)")
    print(f"{'requests':<44}{r['requests']:>8}")
    for outcome, n in r["outcomes"].items():
        print(f"  {outcome[:60]:<42}{n:>8}")
    print("by kind:")
    for key, n in r["by_kind"].items():
        print(f"  {key[:60]:<42}{n:>8}")
    for cls, v in r["latency"].items():
        if v["n"]:
            print(f"latency of {cls + 's':<33}p50 {v['p50_s']:.3f} s   p99 {v['p99_s']:.3f} s   (n={v['n']})")
    print(f"{'server peak RSS':<44}{r['server_peak_rss_mb']:>8} MB")
    print(f"{'server exit after SIGTERM':<44}{str(r['server_exit']):>8}  in {r['server_exit_s']} s")
    print(f"{'tracebacks in the server log':<44}{r['tracebacks_in_server_log']:>8}  ({r['server_log']})")
    print(f"{'lost':<44}{r['lost']:>8}  " + ("(nothing lost)" if not r["lost"] else "(SOME REQUESTS WERE LOST)"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="what `kimi-hybrid serve -m` takes (default: the tiny preset)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the clients run before the SIGTERM")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--backend", help="the expert backend (default: the server's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()
    r = soak(args)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print_table(r)
    sys.exit(0 if r["lost"] == 0 and r["server_exit"] == 0 else 1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
