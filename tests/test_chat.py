"""Chat templates: the built-in BitNet format, checkpoint templates, and the jinja sandbox."""

from __future__ import annotations

import re

import pytest

from ternlm.chat import BITNET_TEMPLATE, GENERIC_TEMPLATE, choose_template, encode_chat, render
from ternlm.errors import TernlmError
from ternlm.tokenizer import Tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi\n"},
]
# The template shipped in microsoft/bitnet-b1.58-2B-4T's tokenizer_config.json (Llama-3 layout).
HF_2B4T_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
)


def test_bitnet_template_exact() -> None:
    text = render(MESSAGES, BITNET_TEMPLATE, bos_token=BOS, eos_token=EOS)
    assert text == "<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi<|eot_id|>Assistant: "
    assert text == render(MESSAGES, HF_2B4T_TEMPLATE, bos_token=BOS, eos_token=EOS)


def test_bitnet_template_multi_turn_without_generation_prompt() -> None:
    msgs = [*MESSAGES, {"role": "assistant", "content": " Hello! "}]
    text = render(msgs, BITNET_TEMPLATE, BOS, EOS, add_generation_prompt=False)
    assert text.endswith("User: Hi<|eot_id|>Assistant: Hello!<|eot_id|>")
    assert text == render(msgs, HF_2B4T_TEMPLATE, BOS, EOS, add_generation_prompt=False)


def test_generic_template_uses_tokenizer_eos() -> None:
    text = render([{"role": "user", "content": "Hi"}], GENERIC_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert text == "<s>User: Hi</s>Assistant: "
    assert render([{"role": "user", "content": "Hi"}], None) == "User: Hi" + "Assistant: "


def test_content_parts_are_joined() -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert "User: ab<|eot_id|>" in render(msgs, BITNET_TEMPLATE, BOS, EOS)
    with pytest.raises(TernlmError, match="image_url"):
        render([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], BITNET_TEMPLATE)
    with pytest.raises(TernlmError, match="role"):
        render([{"content": "no role"}], BITNET_TEMPLATE)


def test_choose_template() -> None:
    own = "{{ messages[0]['content'] }}"
    assert choose_template(None, "bitnet") == BITNET_TEMPLATE
    assert choose_template(own, "bitnet") == own
    assert choose_template(None, "llama") == GENERIC_TEMPLATE
    assert choose_template(own, "llama") == own
    broken = "{% for m in messages %}Human: {{ m['content'] }}\n\nBITNETAssistant: {% endfor %}"
    assert choose_template(broken, "bitnet-b1.58") == BITNET_TEMPLATE


def test_hf_helpers() -> None:
    tpl = (
        "{% for m in messages %}{{ m | tojson }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
        "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
    )
    text = render([{"role": "user", "content": "<é>"}], tpl)
    assert text == '{"role": "user", "content": "<é>"}401'
    with pytest.raises(TernlmError, match="only user roles"):
        render(MESSAGES, "{{ raise_exception('only user roles') }}")


def test_trim_and_lstrip_blocks() -> None:
    tpl = "{% for m in messages %}\n  {% if m['role'] == 'user' %}\n{{ m['content'] }}\n  {% endif %}\n"
    tpl += "{% endfor %}"
    assert render([{"role": "user", "content": "x"}], tpl) == "x\n"


@pytest.mark.parametrize(
    "tpl",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ messages.append(1) }}",  # the environment is immutable
    ],
)
def test_sandbox_refuses_unsafe_templates(tpl: str) -> None:
    with pytest.raises(TernlmError, match="unsafe"):
        render(MESSAGES, tpl)


def test_template_errors_are_ternlm_errors() -> None:
    with pytest.raises(TernlmError, match=re.escape("syntax error at line 1")):
        render(MESSAGES, "{% for m in messages %}")
    with pytest.raises(TernlmError, match="chat template failed"):
        render(MESSAGES, "{{ messages[0]['content'] + 1 }}")


def test_encode_chat_has_one_bos(byte_tokenizer_dir) -> None:
    tok = Tokenizer.from_dir(byte_tokenizer_dir)
    ids = encode_chat(tok, MESSAGES, "bitnet")
    assert ids[0] == tok.bos_id and ids[1] != tok.bos_id
    # The fixture's own template wins over the built-in one.
    assert tok.decode(ids, skip_special=False) == "<|begin_of_text|>Be brief.Hi\n"
    tok.chat_template = None
    ids = encode_chat(tok, MESSAGES, "bitnet")
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids, skip_special=False) == render(MESSAGES, BITNET_TEMPLATE, BOS, EOS)
