"""--reasoning-parser: a thinking reply split into reasoning and content, whole and streamed."""
from __future__ import annotations

import numpy as np
import pytest

from engine.reasoning import ReasoningParser, ReasoningStream

QWEN, R1 = ReasoningParser("qwen3"), ReasoningParser("deepseek_r1")


@pytest.mark.parametrize("parser, prompt_thinks, text, want", [
    (QWEN, False, "<think>Add 2 and 2.</think>\n\nIt is 4.", ("Add 2 and 2.", "It is 4.")),
    (QWEN, False, "It is 4.", (None, "It is 4.")),  # no thought: all content
    (QWEN, False, "4 < 5 and <think> is a tag", (None, "4 < 5 and <think> is a tag")),
    (QWEN, True, "Add them.</think>4", ("Add them.", "4")),  # the template opened the block
    (QWEN, True, "<think>Add them.</think>4", ("Add them.", "4")),
    (QWEN, True, "Add them, then", ("Add them, then", None)),  # cut short: all reasoning
    (QWEN, False, "<think>a</think>\n\n", ("a", None)),
    (QWEN, False, "<think></think>b </think> c", ("", "b </think> c")),  # only the first close counts
    (R1, True, "Let me see.</think>Yes.", ("Let me see.", "Yes.")),  # R1 thinks from the start
    (R1, True, "<think>Let me see.</think> Yes.", ("Let me see.", "Yes.")),
    (R1, False, "{\"a\": 1}", (None, "{\"a\": 1}")),  # guided: only its own <think> opens a thought
    (R1, True, "<think>still thinking", ("still thinking", None)),
])
def test_split(parser, prompt_thinks, text, want):
    assert parser.split(text, prompt_thinks) == want


def test_prompt_decides_where_the_reply_starts():
    assert QWEN.start("<|im_start|>assistant\n<think>\n") == "open"
    assert QWEN.start("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "closed"  # enable_thinking=False
    assert QWEN.start("<|im_start|>assistant\n") == "optional"
    assert R1.start("<｜Assistant｜>") == "open" and R1.start("x</think>\n") == "closed"
    with pytest.raises(ValueError, match="qwen3, deepseek_r1"):
        ReasoningParser("granite")


REPLIES = ["<think>Two apples and three: 2 + 3 < 6, so five.</think>\n\nFive apples.",
           "<think>\n</think>\n\n<tool_call>{\"name\": \"f\"}</tool_call>", "Plain answer <think>not a tag start",
           "<think>never closed <", "<thin", "<think>ends on a partial close </thi", "<", "",
           "</think> stray close first"]


@pytest.mark.parametrize("parser", [QWEN, R1])
@pytest.mark.parametrize("prompt_thinks", [False, True])
def test_streamed_pieces_add_up_to_the_whole(parser, prompt_thinks):
    """Random token boundaries: what streams is always a prefix of the whole reply's split, and adds up to it."""
    rng = np.random.default_rng(7)
    for reply in REPLIES:
        want_reasoning, want_content = parser.split(reply, prompt_thinks)
        for _ in range(20):
            cuts = sorted(set(rng.integers(0, len(reply) + 1, size=rng.integers(0, 8)).tolist()) | {len(reply)})
            stream, reasoning, content, start = ReasoningStream(parser, prompt_thinks), "", "", 0
            for cut in cuts:
                r, c = stream.feed(reply[start:cut], final=cut == len(reply))
                reasoning, content, start = reasoning + r, content + c, cut
                assert (want_reasoning or "").startswith(reasoning), (reply, cut)
                assert (want_content or "").startswith(content), (reply, cut)
            assert (reasoning, content) == (want_reasoning or "", want_content or ""), reply
            assert stream.thinks == (want_reasoning is not None)


def test_held_back_tag_starts_match_a_brute_force_search():
    """The partial-tag hold-back (reasoning's and the tool parser's): the longest end of the text that begins the
    tag, tags whose first character repeats included."""
    from engine.tools import tag_start
    rng = np.random.default_rng(1)
    for _ in range(5000):
        tag = str(rng.choice(["<tool_call>", "</think>", "<think>", "aab", "<<x"]))
        text = "".join(rng.choice(list("<>/thinkaxb_ "), size=rng.integers(0, 14)))
        want = next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-k:])), 0)
        assert tag_start(text, tag) == want, (text, tag)
