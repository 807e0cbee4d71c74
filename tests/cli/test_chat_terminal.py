"""`minicpmo chat` in a real pseudo-terminal (pexpect): line editing and history, Ctrl-C during the
prefill, during a reply and at the prompt, replies fed back as the ids the model produced, Ctrl-D."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

DRIVER = Path(__file__).resolve().parent / "slow_chat.py"
STATS = re.compile(r"\[(\d+) prompt tokens(?: \((\d+) cached\))?, (\d+) generated; prefill [\d.]+ tok/s, "
                   r"decode [\d.]+ tok/s\]")


class Chat:
    def __init__(self, bundle: Path, tmp_path: Path, *args: str):
        self.delays = tmp_path / "delays.json"
        self.set_delays()
        env = {**os.environ, "HOME": str(tmp_path), "TERM": "xterm", "PYTHONUNBUFFERED": "1",
               "SLOW_CHAT_DELAYS": str(self.delays)}
        self.p = pexpect.spawn(sys.executable, [str(DRIVER), "chat", "--model", str(bundle), *args], env=env,
                               encoding="utf-8", timeout=120, dimensions=(40, 250))
        self.p.expect("ready")
        self.prompt()

    def set_delays(self, prefill: float = 0.0, step: float = 0.0) -> None:
        self.delays.write_text(json.dumps({"prefill": prefill, "step": step}))

    def prompt(self) -> None:
        self.p.expect("> ")

    def ask(self, text: str) -> tuple[int, int, int]:
        """Send a question; (prompt tokens, cached tokens, generated tokens) from its stats line."""
        self.p.sendline(text)
        self.p.expect(STATS)
        prompt, cached, generated = self.p.match.groups()
        self.prompt()
        return int(prompt), int(cached or 0), int(generated)


def test_chat_in_a_terminal(fp32_bundle, tmp_path):
    chat = Chat(fp32_bundle, tmp_path, "--max-tokens", "24")
    p = chat.p
    # a reply fed back as the ids it was generated as: the next turn finds all of it in the KV cache
    # (the last generated token was sampled but never fed to the decoder, so it is the one not cached)
    prompt1, _, generated1 = chat.ask("Hello there")
    prompt2, cached2, _ = chat.ask("Tell me more")
    assert cached2 == prompt1 + generated1 - 1
    assert prompt2 > prompt1 + generated1

    # line editing: three Left arrows, then a letter typed before "xyz"; then Up recalls the line
    p.send("\\xyz" + "\x1b[D" * 3 + "q\r")
    p.expect(r"unknown command \\qxyz; \\help lists the commands")
    chat.prompt()
    p.send("\x1b[A\r")
    p.expect(r"unknown command \\qxyz")
    chat.prompt()

    # Ctrl-C at the prompt clears the line
    p.send("half a question")
    p.sendintr()
    chat.prompt()
    p.sendline("\\help")
    p.expect(r"\\clear +start a new conversation")
    chat.prompt()

    # Ctrl-C during the prefill: the question is dropped, the chat goes on
    chat.set_delays(prefill=30.0)
    p.sendline("A question to drop")
    p.expect("A question to drop")
    p.sendintr()
    p.expect(r"\(interrupted; the question was dropped\)", timeout=10)
    chat.prompt()

    # Ctrl-C during a reply: it stops, and what was shown stays in the conversation
    chat.set_delays(step=0.3)
    p.sendline("Talk at length")
    p.expect("Talk at length\r\n")
    p.expect(r"\S")  # the first piece of the reply
    p.sendintr()
    p.expect(r"\(interrupted; the reply so far stays in the conversation\)", timeout=10)
    chat.prompt()
    chat.set_delays()
    prompt3, cached3, _ = chat.ask("And now?")
    assert cached3 > prompt2  # the earlier turns, and the part of the reply that ran, are still cached

    before = p.before
    assert "Traceback" not in before and "error:" not in before
    p.sendeof()  # Ctrl-D leaves, on a new line
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
    history = (tmp_path / ".minicpmo_history").read_text()
    assert "Tell me more" in history and "\\qxyz" in history


def test_chat_commands_and_context(fp32_bundle, tmp_path):
    chat = Chat(fp32_bundle, tmp_path, "--max-tokens", "8", "--context", "160", "--system", "Be terse.")
    p = chat.p
    p.sendline("\\system")
    p.expect(r"system prompt restored to the default; conversation cleared")
    chat.prompt()
    p.sendline("\\image")
    p.expect(r"usage: \\image SRC \[question\]")
    chat.prompt()
    p.sendline("\\image /no/such/picture.png")
    p.expect(r"error: .*/no/such/picture.png")
    chat.prompt()
    # fill the context: a turn that no longer fits says what to do
    for _ in range(8):
        p.sendline("word " * 12)
        index = p.expect([STATS, r"error: (.*)context(.*)\\clear starts a new conversation"])
        chat.prompt()
        if index == 1:
            break
    else:
        pytest.fail("the context never filled up")
    p.sendline("\\clear")
    p.expect(r"\(conversation cleared\)")
    chat.prompt()
    prompt, cached, generated = chat.ask("Fresh start")  # a new conversation answers again
    assert generated >= 1 and cached < prompt
    p.sendline("\\exit")
    p.expect(pexpect.EOF)
    p.close()
    assert p.exitstatus == 0
