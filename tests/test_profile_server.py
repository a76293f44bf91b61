import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "profile_server", Path(__file__).resolve().parents[1] / "scripts" / "profile_server.py")
ps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ps)


def test_profile_server_streams_every_token(tmp_path, capsys):
    """Every stream's tokens arrive (the script fails otherwise) and the figures add up."""
    out = tmp_path / "server.json"
    ps.main(["--num-streams", "6", "--input-len", "5", "--output-len", "9", "--synthetic-vocab", "500",
             "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["tokens"] == 6 * 9 and 6 <= res["chunks"] <= 6 * 9
    assert res["steps"] >= 9 and res["tok_s"] > 0
    assert abs(res["us_per_token"] - 1e6 * res["elapsed_s"] / res["tokens"]) < 1e-6
    assert "6 streams x 9 tokens" in capsys.readouterr().out
