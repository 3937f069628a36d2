"""`tinychat chat`: a conversation over one `tinychat.Model` (chat template, KV cache kept between turns, context
policy) and the terminal loop around it (line editing and history, commands, Ctrl-C)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tinychat.api import Completion, Model
from tinychat.engine import CLI_SAMPLING, SamplingParams
from tinychat.errors import GenerationError, TinychatError

PROMPT = ">>> "
LONG_PREFILL_S = 2.0  # a prompt expected to take longer than this to read shows its progress


class ChatSession:
    """Messages in OpenAI shape; each turn prefills only what the cache does not hold yet.

    Context policy: when the conversation plus room for the answer no longer fits, the oldest turns (never the
    system message) are dropped and the rest is prefilled again; this is said once on stderr.
    """

    def __init__(self, llm: Model, system: str | None = None, params: SamplingParams = CLI_SAMPLING):
        self.llm, self.params = llm, params
        self.system = system
        self.messages: list[dict] = []
        self.trimmed_notice_given = False
        self.last: Completion | None = None  # the last answer's result (/stats)

    def reset(self, system: str | None = None) -> None:
        self.system = system if system is not None else self.system
        self.messages = []
        self.llm.reset()

    def _fitted_messages(self) -> list[dict]:
        """The conversation to send (system message first), its oldest turns dropped until it fits."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        context = self.llm.context_length
        room = min(self.params.max_new_tokens, context // 2)
        while True:
            ids = self.llm.chat_prompt_ids(head + self.messages)
            if len(ids) + room <= context or len(self.messages) <= 1:
                break
            # drop the oldest exchange: the first user message and everything up to the next user message
            drop = next((i for i, m in enumerate(self.messages[1:], 1) if m["role"] == "user"), len(self.messages) - 1)
            self.messages = self.messages[drop:]
            if not self.trimmed_notice_given:
                print("[context full: dropping the oldest turns]", file=sys.stderr)
                self.trimmed_notice_given = True
        if len(ids) >= context:
            self.messages.pop()
            raise GenerationError(
                f"this message needs {len(ids)} tokens with the template; the context holds {context}"
            )
        return head + self.messages

    def send(self, text: str, progress: Callable[[int, int], None] | None = None) -> Iterator[str]:
        """Add a user message and stream the answer; the answer is kept even when the caller stops early.
        progress(done, total): the prefill's progress (`Model.chat`)."""
        self.messages.append({"role": "user", "content": text})
        stream = self.llm.chat(self._fitted_messages(), stream=True, progress=progress,
                               **dataclasses.asdict(self.params))
        answer: list[str] = []
        try:
            with stream:
                for piece in stream:
                    answer.append(piece)
                    yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
            self.last = stream.completion


class PrefillProgress:
    """The progress of a prefill expected to take more than LONG_PREFILL_S, on `err`: a line updated in place on a
    terminal (cleared when the prefill ends), else one line when it starts. Estimated from the chunks so far."""

    def __init__(self, err):
        self.err, self.tty = err, getattr(err, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        elapsed = time.perf_counter() - self.t0
        left = elapsed * (total - done) / done
        if done >= total:
            self.clear()
            return
        if not self.shown and elapsed + left < LONG_PREFILL_S:
            return
        if self.tty:
            print(f"\r\033[K[reading the prompt: {done} of {total} tokens, about {left:.0f} s left]", end="",
                  file=self.err, flush=True)
        elif not self.shown:
            print(f"[reading a long prompt: {total} tokens, about {elapsed + left:.0f} s]", file=self.err, flush=True)
        self.shown = True

    def clear(self) -> None:
        """Remove the terminal's progress line (the answer, or an interruption's note, starts on a clean line)."""
        if self.shown and self.tty:
            print("\r\033[K", end="", file=self.err, flush=True)
            self.shown = False


HELP = """commands:
  /reset          clear the conversation (keeps the system message)
  /system [TEXT]  show the system message, or set it (the conversation starts over)
  /stats          timings of the last answer: TTFT, prefill and decode tok/s, context used
  /help           this list
  /exit, /quit    leave (Ctrl-D too)
Ctrl-C stops an answer and keeps the conversation; Esc then Enter inserts a new line; pasted text keeps its lines."""


def _history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "tinychat" / "chat_history"


def _plain_line_reader(stdin, prompt_to) -> Callable[..., str]:
    def read(default: str = "") -> str:  # piped input: nothing is typed during an answer, so default is always ""
        if prompt_to is not None:
            print(PROMPT, end="", flush=True, file=prompt_to)
        line = stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read


def _line_reader(interactive: bool) -> Callable[..., str]:
    """A function that returns the next input line (raises EOFError at the end, KeyboardInterrupt on Ctrl-C)."""
    if not interactive:  # piped: answers alone on stdout; a prompt only for a person typing, on stderr
        return _plain_line_reader(sys.stdin, sys.stderr if sys.stdin.isatty() else None)
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    try:
        path = _history_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    prompt = PromptSession(history=history, key_bindings=bindings, enable_history_search=True)
    return lambda default="": prompt.prompt(PROMPT, default=default)


@contextlib.contextmanager
def _held_input(stdin, held: list[str]):
    """While an answer streams to the terminal, what the user types or pastes is neither echoed into the answer nor
    split into lines that would each become a message: the terminal's echo and line mode are off (Ctrl-C still
    interrupts), and whatever arrived is appended to `held`, for the next prompt to show as one message."""
    import termios

    fd = stdin.fileno()
    saved = termios.tcgetattr(fd)
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ECHO | termios.ICANON)  # lflag: no echo, no line editing; ISIG stays (Ctrl-C)
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        chunks = []
        while select.select([fd], [], [], 0)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            chunks.append(data)
        termios.tcsetattr(fd, termios.TCSANOW, saved)
        text = b"".join(chunks).decode("utf-8", errors="replace")
        text = re.sub(r"\x1b\[20[01]~", "", text).replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        if text:
            held.append(text)


def format_stats(session: ChatSession) -> str:
    c = session.last
    if c is None or not c.prompt_tokens:
        return "no answer yet"
    used, room = c.prompt_tokens + c.completion_tokens, session.llm.context_length
    return (f"prompt {c.prompt_tokens} tokens ({c.reused_tokens} reused from the cache, "
            f"{c.prompt_tokens - c.reused_tokens} prefilled at {c.prefill_tok_s:.1f} tok/s) | "
            f"TTFT {c.ttft_s * 1000:.0f} ms | {c.completion_tokens} generated at {c.decode_tok_s:.1f} tok/s | "
            f"finish: {c.finish_reason} | context {used}/{room}")


def run_chat(session: ChatSession, interactive: bool, out=sys.stdout, err=sys.stderr) -> int:
    """The read-answer loop of `tinychat chat`; returns the exit status."""
    if interactive:  # Ctrl-C must stop an answer even when we were started with SIGINT ignored (`cmd &`, nohup)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    read_line = _line_reader(interactive)
    held: list[str] = []  # typed during the last answer: the next prompt starts with it, as one message
    while True:
        try:
            line = read_line("\n".join(held))
            held.clear()
        except EOFError:
            if interactive:
                print(file=out)  # end the prompt's line
            return 0
        except KeyboardInterrupt:  # at the prompt: drop the line, keep the session
            continue
        text = line.strip()
        if not text:
            continue
        command, _, rest = text.partition(" ")
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(HELP, file=err)
        elif command == "/reset":
            session.reset()
            print("[conversation cleared]", file=err)
        elif command == "/system":
            if rest.strip():
                session.reset(system=rest.strip())
                print("[system message set; conversation cleared]", file=err)
            else:
                print(f"[system: {session.system!r}]" if session.system else "[no system message]", file=err)
        elif command == "/stats":
            print(f"[{format_stats(session)}]", file=err)
        elif command.startswith("/") and "\n" not in text and command[1:].isalpha():
            print(f"[unknown command {command}: /help lists them]", file=err)
        else:
            quiet = _held_input(sys.stdin, held) if interactive else contextlib.nullcontext()
            progress = PrefillProgress(err)
            try:
                with quiet:
                    for piece in session.send(line, progress):
                        print(piece, end="", flush=True, file=out)
            except KeyboardInterrupt:
                progress.clear()
                print(" [stopped]", end="", file=out)
            except TinychatError as e:
                print(f"error: {e}", file=err)
            print(flush=True, file=out)
            if held:
                print("[what you typed during the answer waits in the prompt: Enter sends it as one message]",
                      file=err)
