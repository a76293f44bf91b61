"""scripts/profile_host.py on a few requests: every decode step runs with the device step stubbed out, every
request finishes with its full length, and the JSON splits the host time into its parts."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("profile_host", ROOT / "scripts" / "profile_host.py")
ph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ph)


def test_profile_host_times_the_parts_of_decode_steps(tmp_path, capsys):
    out = tmp_path / "host.json"
    ph.main(["--num-prompts", "12", "--input-len", "9", "--output-len", "6", "--max-num-seqs", "16",
             "--max-num-batched-tokens", "64", "--synthetic-vocab", "1000", "--profile", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    parts = res["median_ms"]
    assert set(parts) == {"total", "schedule", "prepare", "dispatch", "update", "other"}
    assert res["decode_steps"] >= 4 and parts["total"] > 0 and parts["update"] > 0
    assert abs(sum(v for k, v in parts.items() if k != "total") - parts["total"]) < 1e-6
    assert "tottime" in res["profile"]
    assert "decode steps of ~12 rows" in capsys.readouterr().out


def test_profile_host_with_a_trained_bpe(tmp_path):
    """--bpe-vocab detokenizes with an HF byte-level BPE trained on the standard library's sources (the fast
    DecodeStream path), sampling ids over its whole vocabulary."""
    out = tmp_path / "host.json"
    ph.main(["--num-prompts", "8", "--input-len", "5", "--output-len", "6", "--max-num-seqs", "8",
             "--max-num-batched-tokens", "64", "--bpe-vocab", "600", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["tokenizer"] == "HFTokenizer" and res["bpe_vocab"] == 600
    assert res["decode_steps"] >= 3 and res["median_ms"]["update"] > 0
