"""`kimi-hybrid chat` in a real pseudo-terminal (pexpect): streamed tokens, Ctrl-C mid-answer with the
partial answer kept and then dropped, /save, /reset, /load, and Ctrl-D to leave."""
from __future__ import annotations

import json
import sys

import pexpect
import pytest

PROMPT = ">>> "


@pytest.fixture()
def chat(tiny_path, tmp_path):
    # a long answer (a context and max-tokens far past what the test waits for) so Ctrl-C lands mid-answer
    args = ["-c", "from hybrid.cli.main import main; main()", "chat", "-m", str(tiny_path), "--context", "131072",
            "--max-tokens", "100000", "--seed", "0"]
    child = pexpect.spawn(sys.executable, args, cwd=str(tmp_path), encoding="utf-8", timeout=30,
                          dimensions=(40, 120))
    child.expect_exact("/help for commands")
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def interrupt_mid_answer(child, message: str) -> str:
    """Send a message, wait until tokens are streaming, press Ctrl-C; returns the streamed text seen."""
    child.sendline(message)
    child.expect_exact(message)  # the terminal's echo
    child.expect(r"\S{40}", timeout=30)  # tokens are arriving (reasoning, dim)
    streamed = child.after
    child.sendintr()
    child.expect_exact("keep the partial answer in the conversation? [y/N]")
    return streamed


def test_chat_in_a_terminal(chat, tmp_path):
    streamed = interrupt_mid_answer(chat, "tell me a long story")
    assert streamed
    chat.sendline("y")
    chat.expect_exact("[interrupted; the partial answer is kept]")
    chat.expect_exact(PROMPT)

    chat.sendline("/save kept.json")
    chat.expect_exact("saved 2 messages to kept.json")
    chat.expect_exact(PROMPT)
    kept = json.loads((tmp_path / "kept.json").read_text())["messages"]
    assert [m["role"] for m in kept] == ["user", "assistant"]
    assert kept[0]["content"] == "tell me a long story"
    partial = kept[1].get("reasoning_content", "") + kept[1]["content"]
    assert 0 < len(partial) < 100000  # stopped early, kept what was written

    interrupt_mid_answer(chat, "and another")
    chat.sendline("n")
    chat.expect_exact("[interrupted; the turn is dropped]")
    chat.expect_exact(PROMPT)
    chat.sendline("/save dropped.json")
    chat.expect_exact(PROMPT)
    assert json.loads((tmp_path / "dropped.json").read_text())["messages"] == kept

    chat.sendline("/reset")
    chat.expect_exact("conversation cleared")
    chat.expect_exact(PROMPT)
    chat.sendline("/load kept.json")
    chat.expect_exact("loaded 2 messages from kept.json")
    chat.expect_exact(PROMPT)

    chat.sendeof()  # Ctrl-D leaves
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_a_finished_answer_shows_the_status_line(tiny_path, tmp_path):
    child = pexpect.spawn(sys.executable, ["-c", "from hybrid.cli.main import main; main()", "chat", "-m", str(tiny_path),
                                           "--max-tokens", "12", "--hide-thinking"],
                          cwd=str(tmp_path), encoding="utf-8", timeout=30, dimensions=(40, 160))
    child.expect_exact(PROMPT)
    child.sendline("hi")
    child.expect(r"\[(length|stop)\] prompt \d+ tokens, prefill [\d,.]+ tok/s \| \d+ generated")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
