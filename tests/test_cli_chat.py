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
    # the stopped turn's speed line, then the question
    child.expect(r"\[interrupted\] [\d,]+ prompt tokens computed, prefill [\d,.]+ tok/s \| [1-9][\d,]* generated, "
                 r"decode [\d,.]+ tok/s")
    child.expect_exact("keep the partial answer in the conversation? [y/N]")
    return streamed


def test_chat_in_a_terminal(chat, tmp_path):
    streamed = interrupt_mid_answer(chat, "tell me a long story")
    assert streamed
    chat.sendline("y")
    chat.expect_exact("[interrupted; the partial answer is kept]")
    chat.expect_exact(PROMPT)

    chat.sendline("/stats")  # the stopped turn counts
    chat.expect(r"0 answers \(1 interrupted\), [1-9][\d,]* tokens generated")
    chat.expect(r"the conversation takes [1-9][\d,]* of the 131,072 context tokens")
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
    chat.sendline("/stats")  # the cleared conversation, not the last answer's
    chat.expect_exact("the conversation takes 0 of the 131,072 context tokens")
    chat.expect_exact(PROMPT)
    chat.sendline("/load kept.json")
    chat.expect_exact("loaded 2 messages from kept.json")
    chat.expect_exact(PROMPT)

    chat.sendline("/system Be brief.")  # /save and /load count the system prompt alike
    chat.expect_exact(PROMPT)
    chat.sendline("/save sys.json")
    chat.expect_exact("saved 3 messages (system prompt and 2 more) to sys.json")
    chat.expect_exact(PROMPT)
    chat.sendline("/load sys.json")
    chat.expect_exact("loaded 3 messages (system prompt and 2 more) from sys.json")
    chat.expect_exact(PROMPT)
    chat.sendline("/load nope.json")
    chat.expect_exact("error: nope.json: no such file")
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
    child.expect(r"\[(cut at --max-tokens|finished)\] prompt \d+ tokens, prefill [\d,.]+ tok/s \| \d+ generated")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_the_first_run_says_it_compiles_the_kernels(tiny_path, tmp_path):
    # a fresh install: Numba's cache reads as empty (so the spinner says why the wait), though the kernels
    # here load from the cache (a real compile would take a minute of this test)
    code = "import hybrid.cli.warmup as w; w.kernels_cached = lambda: False; from hybrid.cli.main import main; main()"
    child = pexpect.spawn(sys.executable, ["-c", code, "chat", "-m", str(tiny_path)], cwd=str(tmp_path),
                          encoding="utf-8", timeout=30, dimensions=(40, 160))
    child.expect_exact("compiling CPU kernels, first run only")
    child.expect_exact("/help for commands")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_hidden_thinking_counts_live(tiny_path, tmp_path):
    child = pexpect.spawn(sys.executable, ["-c", "from hybrid.cli.main import main; main()", "chat", "-m", str(tiny_path),
                                           "--hide-thinking", "--max-tokens", "400", "--seed", "0", "--on-interrupt",
                                           "drop"], cwd=str(tmp_path), encoding="utf-8", timeout=30, dimensions=(40, 160))
    child.expect_exact(PROMPT)
    child.sendline("think hard")
    # the live count (how often it is redrawn: test_folded_thinking_redraws_at_most_ten_times_a_second; here
    # the tiny model's few hundred thinking tokens may all come within one redraw interval)
    child.expect(r"thinking\.\.\. [\d,]+ tokens, [\d.,]+ s, [\d.,]+ tok/s \(/think on shows it live\)")
    child.expect(r"\[thought: [\d,]+ words, hidden; /think shows it\]")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_folded_thinking_redraws_at_most_ten_times_a_second(monkeypatch):
    """A hidden turn's placeholder on a terminal: drawn at the first reasoning token, redrawn with the
    count, seconds and tok/s once 0.1 s have passed since the last draw (not per token), and replaced by
    the summary when the answer starts. A clock stepped by hand: reasoning tokens 0.04 s apart."""
    import io
    import re

    from rich.console import Console

    from hybrid.cli import chat_ui
    from hybrid.text.parser import ContentDelta, ReasoningDelta

    now = [1000.0]
    monkeypatch.setattr(chat_ui.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    turn = chat_ui.Turn(Console(file=out, force_terminal=True, width=160), show_thinking=False)
    turn.feed(ReasoningDelta("one "))
    for _ in range(10):  # tokens 2..11 at 0.04 .. 0.40 s
        now[0] += 0.04
        turn.feed(ReasoningDelta("more "))
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.getvalue())
    drawn = re.findall(r"thinking\.\.\. ([\d,]+) tokens, ([\d.]+) s, ([\d.,]+) tok/s", text)
    # redrawn at 0.12 s (4 tokens), 0.24 (7) and 0.36 (10): at most every 0.1 s, counts as they were
    assert [int(n) for n, _, _ in drawn] == [4, 7, 10]
    assert [s for _, s, _ in drawn] == ["0.1", "0.2", "0.4"]
    assert text.startswith("thinking... (/think on shows it live)")
    turn.feed(ContentDelta("done"))
    assert "[thought: 11 words, hidden; /think shows it]" in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.getvalue())
