"""Chat-template rendering: exact strings for Llama-3 and ChatML (Qwen2) style templates, HF's jinja extras."""
import datetime
import json

import pytest

from ie_jax.chat_template import (ChatTemplateError, parse_chat_templates, render_chat_template,
                                  select_chat_template)

# Llama-3 instruct style: BOS once, header markers, content trimmed, eot after each turn.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2 / ChatML style, as the checkpoint writes it (one line).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The tool part of Qwen2.5's template, in short: a JSON line per tool inside <tools>.
CHATML_TOOLS_TEMPLATE = """\
{% if tools %}
<|im_start|>system
# Tools
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools><|im_end|>
{% endif %}
{% for message in messages %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
"""

CONVERSATION = [
    {"role": "system", "content": "  Be brief.\n"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? Réponds en français, s'il te plaît."},
]


def test_llama3_template_exact():
    text = render_chat_template(LLAMA3_TEMPLATE, CONVERSATION, bos_token="<|begin_of_text|>",
                                eos_token="<|eot_id|>")
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3? Réponds en français, s'il te plaît.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_prompt = render_chat_template(LLAMA3_TEMPLATE, CONVERSATION[:2], add_generation_prompt=False,
                                     bos_token="<|begin_of_text|>")
    assert no_prompt == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>")


def test_chatml_template_exact():
    text = render_chat_template(CHATML_TEMPLATE, CONVERSATION[1:])
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3? Réponds en français, s'il te plaît.<|im_end|>\n"
        "<|im_start|>assistant\n")
    with_system = render_chat_template(CHATML_TEMPLATE, CONVERSATION[:2], add_generation_prompt=False)
    assert with_system == ("<|im_start|>system\n  Be brief.\n<|im_end|>\n"
                           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n")


def test_block_tags_own_their_lines():
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it; text lines and
    # {{ }} expressions keep theirs.
    template = ("{% for m in messages %}\n    {% if m.role == 'user' %}\n  U:{{ m.content }}\n"
                "    {% endif %}\n{% endfor %}\n")
    messages = [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}, {"role": "user", "content": "c"}]
    assert render_chat_template(template, messages) == "  U:a\n  U:c\n"


def test_tools_and_tojson_match_json_dumps():
    tools = [{"type": "function", "function": {"name": "météo", "description": "Weather <b>& rain</b> 'now'",
                                               "parameters": {"city": {"type": "string"}}}},
             {"type": "function", "function": {"name": "add", "parameters": {"a": 1, "b": [2, 3]}}}]
    text = render_chat_template(CHATML_TOOLS_TEMPLATE, [{"role": "user", "content": "hi"}], tools=tools)
    lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
    assert text == ("<|im_start|>system\n# Tools\n<tools>\n" + lines + "</tools><|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n")
    indented = render_chat_template("{{ tools | tojson(indent=2) }}", [], tools=tools)
    assert indented == json.dumps(tools, ensure_ascii=False, indent=2)
    sorted_compact = render_chat_template("{{ tools[1] | tojson(separators=(',', ':'), sort_keys=true) }}", [],
                                          tools=tools)
    assert sorted_compact == json.dumps(tools[1], separators=(",", ":"), sort_keys=True)


def test_extra_variables_reach_the_template():
    template = "{% for d in documents %}[{{ d.title }}]{% endfor %}{{ 'T' if enable_thinking else 'F' }}{{ eos_token }}"
    docs = [{"title": "α"}, {"title": "β"}]
    assert render_chat_template(template, [], documents=docs, enable_thinking=True, eos_token="</s>") == "[α][β]T</s>"


def test_raise_exception_is_a_value_error():
    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok"
    assert render_chat_template(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be user") as info:
        render_chat_template(template, [{"role": "assistant", "content": "x"}])
    assert isinstance(info.value, ValueError)


def test_strftime_now():
    before = datetime.datetime.now().strftime("%d %b %Y")
    text = render_chat_template("{{ strftime_now('%d %b %Y') }}", [])
    assert text in (before, datetime.datetime.now().strftime("%d %b %Y"))


def test_loop_controls_and_generation_block():
    template = ("{% for m in messages %}{% if m.role == 'stop' %}{% break %}{% endif %}"
                "{% if m.role == 'skip' %}{% continue %}{% endif %}"
                "{% generation %}<{{ m.content }}>{% endgeneration %}{% endfor %}")
    messages = [{"role": "a", "content": "1"}, {"role": "skip", "content": "2"}, {"role": "a", "content": "3"},
                {"role": "stop", "content": "4"}, {"role": "a", "content": "5"}]
    assert render_chat_template(template, messages) == "<1><3>"


def test_sandbox_forbids_mutation_and_internals():
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.append({'role': 'x'}) }}", [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ ''.__class__.__mro__[1].__subclasses__() }}", [])


def test_bad_inputs():
    with pytest.raises(ChatTemplateError, match="compile"):
        render_chat_template("{% for m in messages %}", [])
    with pytest.raises(ValueError, match="list of dicts"):
        render_chat_template(LLAMA3_TEMPLATE, "hello")
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        render_chat_template(LLAMA3_TEMPLATE, [{"role": "user", "content": "x"}, "oops"])


def test_named_templates():
    named = parse_chat_templates([{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}])
    assert named == {"default": "D", "tool_use": "T"}
    assert parse_chat_templates("X") == {"default": "X"} and parse_chat_templates(None) == {}
    assert select_chat_template(named) == "D"
    assert select_chat_template(named, has_tools=True) == "T"
    assert select_chat_template(named, "tool_use") == "T"
    assert select_chat_template(named, "{{ 1 }}") == "{{ 1 }}"
    with pytest.raises(ValueError, match="no chat template"):
        select_chat_template({})
    with pytest.raises(ValueError, match="'rag'"):
        select_chat_template({"rag": "R"})
    with pytest.raises(ValueError, match="name"):
        parse_chat_templates([{"template": "x"}])
