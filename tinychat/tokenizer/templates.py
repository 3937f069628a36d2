"""Chat templates: jinja2 rendered the way transformers renders them.

The sandboxed jinja environment and the compiled-template cache, the built-in templates used when a model ships
none (chosen by what its vocabulary holds), the template a Hugging Face model directory holds, and the preparation of
template input (plain JSON data only, reasoning fields under all the names templates read them by).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from tinychat.errors import ModelLoadError, TinychatError
from tinychat.tokenizer.tokens import _optional_json


class BuiltinTemplate(NamedTuple):
    """A chat template tinychat supplies for a model that ships none."""

    #: What :attr:`tinychat.tokenizer.Tokenizer.chat_template_name` says when this template is used.
    name: str
    #: The jinja source.
    source: str
    #: Tokens a vocabulary holds (each as a single token) when this is its chat format.
    markers: tuple[str, ...]
    #: The token that ends a turn: generation stops at it when the vocabulary holds it.
    end_of_turn: str


_CHATML = BuiltinTemplate(
    name="chatml",
    source=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    markers=(),
    end_of_turn="<|im_end|>",
)

# Renders text-only conversations as Google's Gemma 3 template does: BOS first; a leading system message folded into
# the first turn (its text and a blank line); roles alternating user / assistant, the assistant written "model"; each
# message's text trimmed. Content is a string or a list of {"type": "text", "text": ...} parts.
_GEMMA = BuiltinTemplate(
    name="gemma",
    source=(
        "{%- macro content_text(content, trimmed) -%}"
        "{%- if content is string -%}"
        "{{ content | trim if trimmed else content }}"
        "{%- elif content is iterable and content is not mapping -%}"
        "{%- for part in content -%}"
        "{%- if part['type'] != 'text' -%}"
        "{{ raise_exception('the built-in Gemma chat template renders text only, got a content part of type '"
        " ~ part['type'] | default('(none)')) }}"
        "{%- endif -%}"
        "{{ part['text'] | trim if trimmed else part['text'] }}"
        "{%- endfor -%}"
        "{%- else -%}"
        "{{ raise_exception('message content must be a string or a list of text parts') }}"
        "{%- endif -%}"
        "{%- endmacro -%}"
        "{{ bos_token }}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set first_user_prefix = content_text(messages[0]['content'], false) + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set first_user_prefix = '' -%}"
        "{%- set loop_messages = messages -%}"
        "{%- endif -%}"
        "{%- for message in loop_messages -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
        "{%- endif -%}"
        "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
        "{{ first_user_prefix if loop.first else '' }}"
        "{{ content_text(message['content'], true) }}"
        "{{ '<end_of_turn>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "{{ '<start_of_turn>model\\n' }}"
        "{%- endif -%}"
    ),
    markers=("<start_of_turn>", "<end_of_turn>"),
    end_of_turn="<end_of_turn>",
)

#: The built-in templates in the order they are tried: a model that ships no template gets the first whose markers
#: its vocabulary holds (ChatML, which needs none, last).
BUILTIN_TEMPLATES = (_GEMMA, _CHATML)


def builtin_template(holds: Callable[[str], bool]) -> BuiltinTemplate:
    """The built-in template for a vocabulary; ``holds(token)`` says whether it has ``token`` as a single token."""
    return next(t for t in BUILTIN_TEMPLATES if all(holds(marker) for marker in t.markers))


def _plain(value: Any) -> Any:
    """A copy of template input made of plain JSON types only, so the sandbox never sees the caller's objects.

    Tuples become lists and dict keys strings; numpy / torch scalars become numbers, other objects a
    ``<TypeName>`` placeholder.
    """

    def convert(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return dict(obj)
        item = getattr(obj, "item", None)
        if callable(item):
            try:
                return item()
            except Exception:  # noqa: BLE001 - e.g. an array of several elements: a placeholder below
                pass
        return f"<{type(obj).__name__}>"

    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError, RecursionError) as exc:
        raise TinychatError(f"chat template input is not plain data: {exc}") from exc


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


@lru_cache(maxsize=1)
def _jinja_env():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks assistant text for training masks): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    # jinja's own globals provide dict and namespace; the sandbox keeps templates off attributes starting with "_".
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


@lru_cache(maxsize=16)
def _compile_template(source: str):
    import jinja2

    try:
        return _jinja_env().from_string(source)
    except jinja2.TemplateError as exc:
        raise TinychatError(f"chat template does not compile: {exc}") from exc


def _dir_chat_template(directory: Path, config: Mapping) -> str | None:
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        try:
            return jinja_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{jinja_path}: cannot read chat template: {exc}") from exc
    template = config.get("chat_template")
    if template is None:
        template = _optional_json(directory / "chat_template.json").get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default") or next((t for t in named.values() if isinstance(t, str)), None)
    return template if isinstance(template, str) and template else None
