"""A conversation over one engine: the chat template, the KV cache kept between turns, the context policy."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from tinychat.engine import Engine, SamplingParams
from tinychat.errors import GenerationError


class ChatSession:
    """Messages in OpenAI shape; each turn prefills only what the cache does not hold yet.

    Context policy: when the conversation plus room for the answer no longer fits, the oldest turns (never the
    system message) are dropped and the rest is prefilled again; this is said once on stderr.
    """

    def __init__(self, engine: Engine, system: str | None = None, params: SamplingParams = SamplingParams()):
        self.engine, self.params = engine, params
        self.system = system
        self.messages: list[dict] = []
        self.trimmed_notice_given = False

    def reset(self, system: str | None = None) -> None:
        self.system = system if system is not None else self.system
        self.messages = []
        self.engine.reset()

    def _prompt_ids(self) -> list[int]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        room = min(self.params.max_new_tokens, self.engine.max_seq_len // 2)
        while True:
            ids = self.engine.tokenizer.encode_chat(head + self.messages)
            if len(ids) + room <= self.engine.max_seq_len or len(self.messages) <= 1:
                break
            # drop the oldest exchange: the first user message and everything up to the next user message
            drop = next((i for i, m in enumerate(self.messages[1:], 1) if m["role"] == "user"), len(self.messages) - 1)
            self.messages = self.messages[drop:]
            if not self.trimmed_notice_given:
                print("[context full: dropping the oldest turns]", file=sys.stderr)
                self.trimmed_notice_given = True
        if len(ids) >= self.engine.max_seq_len:
            self.messages.pop()
            raise GenerationError(
                f"this message needs {len(ids)} tokens with the template; the context holds {self.engine.max_seq_len}"
            )
        return ids

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the answer; the answer is kept even when the caller stops early."""
        self.messages.append({"role": "user", "content": text})
        ids = self._prompt_ids()
        answer: list[str] = []
        try:
            for piece in self.engine.stream(ids, self.params):
                answer.append(piece)
                yield piece
        finally:
            self.messages.append({"role": "assistant", "content": "".join(answer)})
