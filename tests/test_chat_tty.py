"""`tinychat chat` driven in a real pseudo-terminal, as a person types (line editor, commands, paste, Ctrl-C)."""

import os
import re
import sys

import pexpect
import pytest

PROMPT = r"\n(?:\x1b\[[0-9;?]*[A-Za-z]|\r)*>>>"  # a fresh prompt line (the editor's redraw of the typed line has no \n)
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # bracketed paste, as terminals send a paste


def spawn_chat(gguf, home, *args):
    env = dict(os.environ, HOME=str(home), XDG_STATE_HOME=str(home / "state"), PYTHONUNBUFFERED="1",
               TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    child = pexpect.spawn(sys.executable, ["-m", "tinychat", "chat", str(gguf), "--quant", "none", "--temperature",
                                           "0", *args], env=env, encoding="utf-8", timeout=90, dimensions=(40, 200))
    child.expect_exact("/help lists the commands")
    child.expect(PROMPT)
    return child


@pytest.fixture
def chat(smollm2_gguf, tmp_path):
    child = spawn_chat(smollm2_gguf, tmp_path, "--max-new-tokens", "300", "--ctx", "2048")
    yield child, tmp_path
    if child.isalive():
        child.terminate(force=True)


def ask(child, text: str) -> str:
    """Type a line, wait for the next prompt, return what the answer printed."""
    child.sendline(text)
    child.expect(PROMPT)
    return _plain(child.before)


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def test_conversation_commands_and_history(chat):
    child, home = chat
    assert "Paris" in ask(child, "What is the capital of France?")
    stats = ask(child, "/stats")
    assert "TTFT" in stats and "tok/s" in stats and "reused from the cache" in stats
    second = ask(child, "And of Germany?")
    assert "Berlin" in second
    stats = ask(child, "/stats")
    reused = int(re.search(r"\((\d+) reused from the cache", stats).group(1))
    assert reused > 30  # the second turn prefilled only its new tokens
    assert "no system message" in ask(child, "/system")
    assert "system message set" in ask(child, "/system You answer like a pirate.")
    assert "pirate" in ask(child, "/system")
    assert "conversation cleared" in ask(child, "/reset")
    assert "/stats" in ask(child, "/help")
    assert "unknown command /nope" in ask(child, "/nope")
    child.send("\x1b[A")  # arrow up: the last line comes back from the history ...
    child.expect_exact("/nope")
    child.send("\x15")  # ... Ctrl-U clears it
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
    history = (home / "state" / "tinychat" / "chat_history").read_text()
    assert "What is the capital of France?" in history  # kept for the next session


def test_ctrl_c_stops_the_answer_and_keeps_the_session(chat):
    child, _ = chat
    child.sendline("Write a very long story about a dragon who learns to read.")
    child.expect_exact("\x1b[?2004l")  # the line editor is done with the terminal (a ^C before it is a keystroke)
    child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(PROMPT)
    stats = ask(child, "/stats")
    assert "finish: cancelled" in stats
    assert "Paris" in ask(child, "What is the capital of France?")  # the session goes on
    child.sendintr()  # Ctrl-C at the prompt drops the line, not the session
    child.expect(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_pasted_lines_are_one_message(chat, smollm2_gguf):
    from gguf import GGUFReader

    from tinychat.tokenizer import Tokenizer

    child, _ = chat
    pasted = "Here is a list:\napple\nbanana\ncherry\nHow many fruits are in the list?"
    child.send(f"{PASTE_START}{pasted}{PASTE_END}")
    child.send("\r")
    child.expect(PROMPT)  # one prompt after the whole paste, not one per line
    stats = ask(child, "/stats")
    tokenizer = Tokenizer.from_gguf(GGUFReader(smollm2_gguf), smollm2_gguf)
    expected = len(tokenizer.encode_chat([{"role": "user", "content": pasted}]))
    assert f"prompt {expected} tokens" in stats  # the model got every line, in one message


def test_a_full_context_drops_the_oldest_turns_and_says_so_once(smollm2_gguf, tmp_path):
    child = spawn_chat(smollm2_gguf, tmp_path, "--max-new-tokens", "24", "--ctx", "128")
    try:
        said = ""
        for question in ["What is the capital of France?", "What is the capital of Spain?",
                         "What is the capital of Italy?", "What is the capital of Japan?",
                         "What is the capital of Egypt?", "What is the capital of Peru?"]:
            said += ask(child, question)
            stats = ask(child, "/stats")
            used, room = map(int, re.search(r"context (\d+)/(\d+)", stats).groups())
            assert room == 128 and used <= 128
        assert said.count("context full: dropping the oldest turns") == 1
        assert "Lima" in said.split("capital of Peru")[-1]  # still answering after the trims
    finally:
        child.terminate(force=True)


def test_typing_during_an_answer_is_held_for_the_next_prompt(chat):
    """Lines typed or pasted while an answer streams neither land in the answer nor become messages of their own:
    they wait in the next prompt, as one message, and Enter sends them."""
    child, _ = chat
    child.sendline("Write a very long story about a dragon who learns to read.")
    child.expect_exact("\x1b[?2004l")  # the line editor is done with the terminal
    child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the answer is streaming
    child.send("first typed line\rsecond typed line\r")
    child.expect_exact("waits in the prompt")
    child.expect(PROMPT)
    answer = _plain(child.before)
    assert "typed line" not in answer.split("[what you typed")[0]  # nothing was echoed into the answer
    child.expect_exact("second typed line")  # the prompt shows the held text
    child.send("\r")  # sent as one message: one answer, then one prompt with nothing waiting in it
    child.expect(PROMPT)
    assert "waits in the prompt" not in _plain(child.before)
    assert "TTFT" in ask(child, "/stats")
