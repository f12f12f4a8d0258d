"""The chat loop's interrupts, driven with a fake input function and fake replies (no model needed)."""

from __future__ import annotations

import io
import sys

import pytest

from lorakit.cli import main
from lorakit.cli.chat import INTERRUPTED, chat_loop, enable_line_editing


def _reader(*events):
    """An ``input`` stand-in: returns the strings, raises the exception classes/instances, in order."""
    queue = list(events)
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        event = queue.pop(0)
        if isinstance(event, str):
            return event
        raise event

    read.prompts = prompts  # type: ignore[attr-defined]
    return read


def _echo(messages):
    return f"echo {messages[-1]['content']} ({len(messages)} messages)"


def test_ctrl_d_at_the_prompt_ends_with_exit_code_0() -> None:
    messages: list = []
    assert chat_loop(_echo, messages, read=_reader("hi", EOFError), err=io.StringIO()) == 0
    assert messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "echo hi (1 messages)"},
    ]


def test_ctrl_c_at_the_prompt_ends_with_exit_code_130() -> None:
    assert chat_loop(_echo, [], read=_reader(KeyboardInterrupt), err=io.StringIO()) == INTERRUPTED == 130


def test_ctrl_c_during_a_reply_returns_to_the_prompt() -> None:
    calls = []

    def respond(messages):
        calls.append([m["content"] for m in messages])
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user stops the first reply half-way
        return "fine"

    err = io.StringIO()
    messages = [{"role": "system", "content": "be brief"}]
    read = _reader("first", "second", "/exit")
    assert chat_loop(respond, messages, read=read, err=err) == 0
    assert read.prompts == ["you> "] * 3  # back at the prompt after the interrupt
    assert "reply interrupted" in err.getvalue()
    # The interrupted exchange is dropped: the second request does not carry the first question.
    assert calls == [["be brief", "first"], ["be brief", "second"]]
    assert [m["content"] for m in messages] == ["be brief", "second", "fine"]


def test_reset_keeps_the_system_message_and_blank_lines_are_skipped() -> None:
    seen = []
    messages = [{"role": "system", "content": "sys"}]
    read = _reader("one", "   ", "/reset", "two", "/quit")
    chat_loop(lambda m: seen.append(len(m)) or "ok", messages, read=read, err=io.StringIO())
    assert seen == [2, 2]  # after /reset the conversation restarts from the system message


def test_keyboard_interrupt_in_any_command_is_exit_130_without_traceback(monkeypatch, capsys) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("lorakit.cli.factorize.run", interrupted)
    assert main(["factorize"]) == 130
    err = capsys.readouterr().err
    assert "lorakit factorize: interrupted." in err and "Traceback" not in err


def test_line_editing_is_on_with_readline_and_off_without(monkeypatch) -> None:
    pytest.importorskip("readline")
    assert enable_line_editing() is True
    monkeypatch.setitem(sys.modules, "readline", None)  # as on a Python built without readline
    assert enable_line_editing() is False
