"""SFT/DPO data: formats and loss masks, clear errors, truncation, packing that never mixes documents."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from finetune.data import DataConfig, preference_dataset, sft_dataset, sft_records
from finetune.formats import DatasetError, load_preference, load_sft, tokenize_preference, tokenize_sft
from finetune.forward import hidden_states, output_projection
from ie_jax.tokenizer import ByteTokenizer
from ft_helpers import tiny

TOK = ByteTokenizer()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_text_format_trains_every_token():
    ex = tokenize_sft({"text": "hello"}, "text", TOK)
    assert ex.ids.tolist() == [TOK.BOS, *b"hello", TOK.EOS]
    assert ex.mask.all()


@pytest.mark.parametrize("completion_only", [True, False])
def test_prompt_completion_mask(completion_only):
    ex = tokenize_sft({"prompt": "Q?", "completion": " A"}, "prompt_completion", TOK, completion_only=completion_only)
    assert ex.ids.tolist() == [TOK.BOS, *b"Q?", *b" A", TOK.EOS]
    expected = [not completion_only] * 3 + [True] * 3
    assert ex.mask.tolist() == expected


def test_messages_mask_covers_assistant_turns_only():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "ok!"}]
    ex = tokenize_sft({"messages": messages}, "messages", TOK)
    assert TOK.decode(ex.ids, skip_special_tokens=False) == TOK.apply_chat_template(messages,
                                                                                   add_generation_prompt=False)
    trained = TOK.decode(ex.ids[ex.mask], skip_special_tokens=False)
    assert trained == "yo<|end|>ok!<|end|>"
    assert tokenize_sft({"messages": messages}, "messages", TOK, completion_only=False).mask.all()


def test_conversational_preference_splits_prompt_and_completions():
    row = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
           "rejected": [{"role": "assistant", "content": "5"}]}
    ex = tokenize_preference(row, TOK)
    assert TOK.decode(ex.prompt_ids, skip_special_tokens=False) == "<|bos|><|user|>2+2?<|end|><|assistant|>"
    assert TOK.decode(ex.chosen_ids, skip_special_tokens=False) == "4<|end|>"
    assert TOK.decode(ex.rejected_ids, skip_special_tokens=False) == "5<|end|>"


def test_bad_lines_name_file_and_line(tmp_path):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}, "", '{"text": broken}'])
    with pytest.raises(DatasetError, match=r"a\.jsonl:3: not valid JSON"):
        load_sft(bad_json, TOK)
    missing = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p2"}])
    with pytest.raises(DatasetError, match=r"b\.jsonl:2: missing column 'completion'"):
        load_sft(missing, TOK)
    no_cols = write_jsonl(tmp_path / "c.jsonl", [{"input": "x"}])
    with pytest.raises(DatasetError, match=r"c\.jsonl:1: no SFT columns"):
        load_sft(no_cols, TOK)
    pref = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}])
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: missing column 'chosen'"):
        load_preference(pref, TOK)


def test_truncation_warns_or_errors(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 40}, {"text": "short"}])
    examples = load_sft(path, TOK)
    with pytest.warns(UserWarning, match="1 of 2 examples are longer"):
        records = sft_records(examples, DataConfig(seq_len=16))
    assert max(len(r["inputs"]) for r in records) == 16
    with pytest.raises(DatasetError, match=r"long\.jsonl:1: the example has 42 tokens"):
        sft_records(examples, DataConfig(seq_len=16, truncation="error"))


def _packed_batch(examples, seq_len, rows):
    cfg = DataConfig(seq_len=seq_len, batch_size=rows, shuffle=False)
    return next(iter(sft_dataset(examples, cfg)))


def test_packing_layout_restarts_positions_and_keeps_targets_in_document():
    examples = [tokenize_sft({"text": t}, "text", TOK) for t in ("abc", "defgh", "ij")]
    batch = _packed_batch(examples, 16, 1)
    seg, pos = batch["segment_ids"][0, 0], batch["positions"][0, 0]
    inputs, targets = batch["inputs"][0, 0], batch["targets"][0, 0]
    for doc in (1, 2, 3):
        idx = np.flatnonzero(seg == doc)
        ids = examples[doc - 1].ids
        assert pos[idx].tolist() == list(range(len(ids) - 1))
        assert inputs[idx].tolist() == ids[:-1].tolist() and targets[idx].tolist() == ids[1:].tolist()
    assert (batch["weights"][0, 0][seg == 0] == 0).all()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_packed_logits_equal_unpacked(preset):
    """Segment ids block cross-document attention: each document's logits in a packed row equal its logits alone."""
    model, _ = tiny(preset)
    rng = np.random.default_rng(0)
    examples = [tokenize_sft({"text": bytes(rng.integers(97, 123, n).tolist()).decode()}, "text", TOK) for n in (5, 9, 4)]
    batch = _packed_batch(examples, 24, 1)
    row = {k: jnp.asarray(v[0]) for k, v in batch.items()}  # [1, T]
    project = output_projection(model)
    packed = project(hidden_states(model, row["inputs"], row["positions"], row["segment_ids"])[0])  # [T, V]
    without_segments = project(hidden_states(model, row["inputs"], row["positions"], None)[0])
    seg = np.asarray(row["segment_ids"][0])
    for doc, ex in enumerate(examples, 1):
        ids = jnp.asarray(ex.ids[:-1])[None]
        alone = project(hidden_states(model, ids, jnp.arange(ids.shape[1])[None], None)[0])
        np.testing.assert_allclose(np.asarray(packed[seg == doc]), np.asarray(alone), atol=1e-5, rtol=1e-5)
        if doc > 1:  # without segment ids the later documents would see the earlier ones
            assert not np.allclose(np.asarray(without_segments[seg == doc]), np.asarray(alone), atol=1e-4)


def test_epochs_shuffle_and_process_sharding():
    examples = [tokenize_sft({"text": chr(97 + i) * 3}, "text", TOK) for i in range(8)]
    cfg = DataConfig(seq_len=8, batch_size=1, packing=False, num_epochs=2, seed=3)
    first = lambda b: int(b["inputs"][0, 0, 1])  # noqa: E731  the row's first byte identifies the example
    order = [first(b) for b in sft_dataset(examples, cfg)]
    assert len(order) == 16 and sorted(order[:8]) == sorted(order[8:]) == list(range(97, 105))
    assert order[:8] != order[8:]  # reshuffled per epoch
    parts = [[first(b) for b in sft_dataset(examples, DataConfig(seq_len=8, batch_size=1, packing=False),
                                           process_index=i, process_count=2)] for i in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(97, 105)) and not set(parts[0]) & set(parts[1])


def test_partial_last_batch_is_padded_with_empty_rows():
    examples = [tokenize_sft({"text": "abcd"}, "text", TOK) for _ in range(3)]
    batches = list(sft_dataset(examples, DataConfig(seq_len=8, batch_size=2, packing=False, shuffle=False)))
    assert len(batches) == 2 and batches[1]["inputs"].shape == (1, 2, 8)
    assert batches[1]["weights"][0, 1].sum() == 0 and batches[1]["segment_ids"][0, 1].sum() == 0
    pairs = [tokenize_preference({"prompt": "p", "chosen": "a", "rejected": "bb"}, TOK) for _ in range(3)]
    b = list(preference_dataset(pairs, DataConfig(seq_len=8, batch_size=2, shuffle=False)))[1]
    assert b["valid"].tolist() == [[1.0, 0.0]]
    assert b["chosen_weights"][0, 0].sum() == 2 and b["rejected_weights"][0, 0].sum() == 3  # completion + EOS
