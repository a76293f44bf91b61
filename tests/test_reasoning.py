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
    (R1, False, "Let me see.</think>Yes.", ("Let me see.", "Yes.")),  # R1 thinks from the start
    (R1, False, "<think>Let me see.</think> Yes.", ("Let me see.", "Yes.")),
    (R1, False, "<think>still thinking", ("still thinking", None)),
])
def test_split(parser, prompt_thinks, text, want):
    reasoning, content, held = parser.split(text, prompt_thinks)
    assert (reasoning, content, held) == (*want, 0)


def test_prompt_decides_where_the_reply_starts():
    assert QWEN.thinks_from_prompt("<|im_start|>assistant\n<think>\n")
    assert not QWEN.thinks_from_prompt("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # enable_thinking=False
    assert not QWEN.thinks_from_prompt("<|im_start|>assistant\n")
    assert R1.thinks_from_prompt("<｜Assistant｜>")
    with pytest.raises(ValueError, match="qwen3, deepseek_r1"):
        ReasoningParser("granite")


REPLIES = ["<think>Two apples and three: 2 + 3 < 6, so five.</think>\n\nFive apples.",
           "<think>\n</think>\n\n<tool_call>{\"name\": \"f\"}</tool_call>", "Plain answer <think>not a tag start",
           "<think>never closed <", "<thin", "<think>ends on a partial close </thi", "<", "",
           "</think> stray close first"]


@pytest.mark.parametrize("parser", [QWEN, R1])
@pytest.mark.parametrize("prompt_thinks", [False, True])
def test_streamed_pieces_add_up_to_the_whole(parser, prompt_thinks):
    """Random token boundaries: what streams is always a prefix of the final split, and adds up to it."""
    rng = np.random.default_rng(7)
    for reply in REPLIES:
        thinks = prompt_thinks or parser.thinks_from_prompt("")
        want_reasoning, want_content, _ = parser.split(reply, thinks)
        for _ in range(20):
            cuts = sorted(set(rng.integers(0, len(reply) + 1, size=rng.integers(0, 8)).tolist()) | {len(reply)})
            stream, reasoning, content, last = ReasoningStream(parser, thinks), "", "", 0
            for cut in cuts:
                new_reasoning, content_so_far = stream.delta(reply[:cut], final=cut == len(reply))
                reasoning += new_reasoning
                content += stream.content_delta(content_so_far)
                assert (want_reasoning or "").startswith(reasoning), (reply, cut)
                assert (want_content or "").startswith(content), (reply, cut)
                last = cut
            assert last == len(reply)
            assert reasoning == (want_reasoning or "") and content == (want_content or ""), reply
