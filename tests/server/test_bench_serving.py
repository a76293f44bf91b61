"""scripts/bench_serving.py against the live server: the random dataset's exact lengths, and ShareGPT / custom JSONL
files counted by the server's /tokenize."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from harness import tok


def bench():
    path = Path(__file__).parents[2] / "scripts" / "bench_serving.py"
    spec = importlib.util.spec_from_file_location("bench_serving", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_bench_serving_client(live, tmp_path):
    b = bench()
    args = b.parse_args(["--base-url", live.url, "--num-prompts", "12", "--random-input-len", "20",
                         "--random-output-len", "6", "--request-rate", "200", "--max-concurrency", "5",
                         "--goodput", "ttft:10000", "--save-result", "--result-dir", str(tmp_path),
                         "--seed", "3", "--disable-tqdm"])
    result = b.main(args)
    assert result["completed"] == 12 and result["failed"] == 0
    assert result["total_input_tokens"] == 12 * 20 and result["total_output_tokens"] == 12 * 6
    assert result["request_goodput"] > 0 and 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"]
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["completed"] == 12 and len(saved["ttfts"]) == 12 and saved["dataset_name"] == "random"


def sharegpt_file(path: Path) -> Path:
    """Conversations as ShareGPT holds them, with the cases vLLM's sampling skips: one turn only, a reply under
    4 tokens, a prompt over 1,024 tokens (the byte tokenizer: one token a byte)."""
    conv = lambda *turns: {"id": "x", "conversations": [{"from": f, "value": v}  # noqa: E731
                                                        for f, v in zip(("human", "gpt") * 3, turns)]}
    data = [conv(f"question number {i} about things", "an answer of a few words " * (1 + i % 3))
            for i in range(6)]
    data += [conv("only one turn here"), conv("a prompt with a short reply", "ok"), conv("y" * 1100, "long prompt"),
             {"id": "empty", "conversations": []}]
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_dataset_lengths_from_the_servers_tokenizer(live, tmp_path):
    b = bench()
    path = sharegpt_file(tmp_path / "sharegpt.json")
    base = ["--base-url", live.url, "--dataset-name", "sharegpt", "--dataset-path", str(path), "--seed", "1",
            "--disable-tqdm", "--request-rate", "inf"]
    result = b.main(b.parse_args(base + ["--num-prompts", "6"]))
    assert result["completed"] == 6 and result["failed"] == 0 and result["dataset_name"] == "sharegpt"
    data = json.loads(path.read_text())
    usable = [(len(tok(live).encode(c["conversations"][0]["value"])),
               len(tok(live).encode(c["conversations"][1]["value"], add_special_tokens=False))) for c in data[:6]]
    assert sorted(result["output_lens"]) == sorted(n for _, n in usable)  # each reply's length, with ignore_eos
    assert sorted(result["input_lens"]) == sorted(n for n, _ in usable)  # the six usable ones: the rest skipped
    fixed = b.main(b.parse_args(base + ["--num-prompts", "3", "--sharegpt-output-len", "5"]))
    assert fixed["output_lens"] == [5, 5, 5]
    with pytest.raises(SystemExit, match="6 usable conversations of 8"):
        b.main(b.parse_args(base + ["--num-prompts", "7"]))


def test_custom_jsonl_dataset(live, tmp_path, capsys):
    b = bench()
    path = tmp_path / "prompts.jsonl"
    prompts = [f"custom prompt {i}" for i in range(5)]
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n")
    result = b.main(b.parse_args(["--base-url", live.url, "--dataset-name", "custom", "--dataset-path", str(path),
                                  "--num-prompts", "4", "--custom-output-len", "3", "--disable-tqdm"]))
    assert result["completed"] == 4 and result["output_lens"] == [3] * 4
    assert set(result["input_lens"]) <= {len(tok(live).encode(p)) for p in prompts}
    path.write_text('{"text": "no prompt key"}\n')
    with pytest.raises(SystemExit, match="prompts.jsonl:1"):
        b.main(b.parse_args(["--base-url", live.url, "--dataset-name", "custom", "--dataset-path", str(path),
                             "--num-prompts", "1", "--disable-tqdm"]))
    with pytest.raises(SystemExit):
        b.parse_args(["--dataset-name", "sharegpt"])
    assert "needs --dataset-path" in capsys.readouterr().err
