"""Render chat messages into a prompt: the checkpoint's own template (sandboxed jinja2) or a built-in one.

The rendered text already contains BOS when the template writes it, so encode it with
`tokenizer.encode(text, add_bos=False)` (or use `encode_chat`), as transformers' apply_chat_template does.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ternlm.errors import TernlmError

if TYPE_CHECKING:
    from ternlm.tokenizer import Tokenizer

# BitNet b1.58 2B4T's trained format (tech report §3.2.2): BOS, then "Role: content<|eot_id|>" per turn,
# then "Assistant: ". Same output as the template in the model's tokenizer_config.json.
BITNET_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

# For checkpoints without a template: the same shape, with the tokenizer's own EOS ending each turn.
GENERIC_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] | trim }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant: {% endif %}"
)

# bitnet.cpp's GGUF converter writes this broken template into 2B4T GGUFs (the model loops under it).
_BROKEN_BITNET_MARKER = "BITNETAssistant"


def choose_template(tokenizer_template: str | None, model_type: str) -> str:
    """The template to use: the checkpoint's own when it has a usable one, else BITNET_TEMPLATE for
    BitNet models ("bitnet", "bitnet-b1.58", …) and GENERIC_TEMPLATE for anything else."""
    is_bitnet = model_type.lower().startswith("bitnet")
    if tokenizer_template and not (is_bitnet and _BROKEN_BITNET_MARKER in tokenizer_template):
        return tokenizer_template
    return BITNET_TEMPLATE if is_bitnet else GENERIC_TEMPLATE


def _raise_exception(message: str) -> NoReturn:
    raise TernlmError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: no HTML escaping (jinja's built-in tojson escapes <, >, & and ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TernlmError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def _content_text(content: Any) -> str:
    """OpenAI-style content may be None, a string, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise TernlmError(f"message content part {part!r} is not supported; only text parts are")
            parts.append(text)
        return "".join(parts)
    raise TernlmError(f"content must be a string or a list of text parts, not {type(content).__name__}")


def _normalize(messages: list[dict]) -> list[dict]:
    if not isinstance(messages, list):
        raise TernlmError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TernlmError(f"messages[{i}] must be a dict with a string 'role'")
        out.append({**m, "content": _content_text(m.get("content"))})
    return out


def render(
    messages: list[dict],
    template: str | None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    add_generation_prompt: bool = True,
    **extra: Any,
) -> str:
    """Prompt text for `messages` under `template` (None → GENERIC_TEMPLATE). `extra` (e.g. `tools`)
    is passed to the template. Every template failure is raised as TernlmError."""
    compiled = _compile(template if template is not None else GENERIC_TEMPLATE)
    try:
        return compiled.render(
            messages=_normalize(messages),
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except TernlmError:
        raise
    except SecurityError as e:
        raise TernlmError(f"chat template attempted an unsafe operation: {e}") from e
    except jinja2.TemplateError as e:
        raise TernlmError(f"chat template failed: {e}") from e
    except Exception as e:  # arbitrary template logic can raise anything (TypeError, KeyError, …)
        raise TernlmError(f"chat template failed: {type(e).__name__}: {e}") from e


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict], model_type: str, add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of the chat prompt; BOS comes from the template text, so none is added on top."""
    template = choose_template(tokenizer.chat_template, model_type)
    text = render(messages, template, tokenizer.bos_token, tokenizer.eos_token, add_generation_prompt)
    return tokenizer.encode(text, add_bos=False)
