"""scripts/bench_startup.py: time to the first 200 on /health, cold then warm, against stand-in servers (the real
serve.py start is measured on the GPU machine); a server that dies or never answers is reported, not waited on."""
import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_startup", ROOT / "scripts" / "bench_startup.py")
bs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bs)


def _only_json(out):
    (path,) = list(Path(out).glob("startup_*.json"))
    return json.loads(path.read_text())


def test_cold_then_warm_starts_of_a_server_that_answers(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")
    cmd = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1 --directory {site}"
    caches = lambda: set(Path(bs.tempfile.gettempdir()).glob("ie-jax-startup-cache-*"))  # noqa: E731
    before = caches()
    rc = bs.main(["--server-cmd", cmd, "--warm-runs", "2", "--timeout", "60", "--out", str(tmp_path / "out")])
    assert rc == 0
    assert caches() == before  # the temporary compilation cache is removed
    runs = _only_json(tmp_path / "out")["runs"]
    assert [r["kind"] for r in runs] == ["cold", "warm", "warm"]
    assert all(r["ready"] and 0 < r["seconds"] < 60 for r in runs)


def test_a_server_that_exits_is_reported_with_its_log_and_stops_the_run(tmp_path, capsys):
    cmd = f"{sys.executable} -c print('no-module-named-fastapi');__import__('sys').exit(3)"
    rc = bs.main(["--server-cmd", cmd, "--warm-runs", "1", "--timeout", "60", "--out", str(tmp_path)])
    assert rc == 1
    (run,) = _only_json(tmp_path)["runs"]  # no warm start after a failed cold one
    assert not run["ready"] and run["why"] == "exited with code 3"
    assert "no-module-named-fastapi" in "\n".join(run["log_tail"])
    assert "no-module-named-fastapi" in capsys.readouterr().err


def test_a_silent_server_times_out_and_is_stopped(tmp_path):
    cmd = f"{sys.executable} -c __import__('time').sleep(60)"
    t0 = time.perf_counter()
    rc = bs.main(["--server-cmd", cmd, "--warm-runs", "0", "--timeout", "1", "--out", str(tmp_path)])
    assert rc == 1 and time.perf_counter() - t0 < 30  # terminated, not waited out
    (run,) = _only_json(tmp_path)["runs"]
    assert run == {**run, "kind": "cold", "ready": False, "why": "not ready after 1 s"}


def test_port_and_cache_dir_are_the_script_s_to_choose(tmp_path):
    for bad in (["--port", "9000"], ["--compilation-cache-dir=/tmp/x"]):
        with pytest.raises(SystemExit):
            bs.main(["--out", str(tmp_path), "--", "--model", "m", *bad])


def test_the_servers_own_start_up_lines_are_kept(tmp_path):
    """serve.py prints where its start-up went (model load, warm-up); the JSON keeps those lines, and only those."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")
    server = tmp_path / "server.py"
    server.write_text(
        "import sys, http.server, functools\n"
        "print('some banner', flush=True)\n"
        "print(\"model 'x' ready on cpu in 0.3 s\", file=sys.stderr, flush=True)\n"
        "print('engine warm-up: 3 step executables in 1.5 s', file=sys.stderr, flush=True)\n"
        f"handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory={str(site)!r})\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), handler).serve_forever()\n")
    rc = bs.main(["--server-cmd", f"{sys.executable} {server} {{port}}", "--warm-runs", "0", "--timeout", "60",
                  "--out", str(tmp_path / "out")])
    assert rc == 0
    (run,) = _only_json(tmp_path / "out")["runs"]
    assert run["log"] == ["model 'x' ready on cpu in 0.3 s", "engine warm-up: 3 step executables in 1.5 s"]


def _openai_stand_in(tmp_path):
    """A server with /health, /v1/models and a /v1/completions whose first answer is slow (a first run owed)."""
    server = tmp_path / "openai_server.py"
    server.write_text(
        "import json, sys, time, http.server\n"
        "calls = []\n"
        "class H(http.server.BaseHTTPRequestHandler):\n"
        "    def log_message(self, *a): pass\n"
        "    def reply(self, obj):\n"
        "        body = json.dumps(obj).encode()\n"
        "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "    def do_GET(self):\n"
        "        self.reply({'status': 'ok'} if self.path == '/health' else {'data': [{'id': 'm'}]})\n"
        "    def do_POST(self):\n"
        "        req = json.loads(self.rfile.read(int(self.headers['Content-Length'])))\n"
        "        assert req['model'] == 'm' and req['max_tokens'] == 8\n"
        "        calls.append(1)\n"
        "        time.sleep(0.3 if len(calls) == 1 else 0.0)\n"
        "        self.reply({'choices': [{'text': ' Paris'}]})\n"
        "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n")
    return f"{sys.executable} {server} {{port}}"


def test_first_requests_after_ready_are_timed(tmp_path):
    rc = bs.main(["--server-cmd", _openai_stand_in(tmp_path), "--warm-runs", "0", "--first-requests", "--timeout",
                  "60", "--out", str(tmp_path / "out")])
    assert rc == 0
    (run,) = _only_json(tmp_path / "out")["runs"]
    first, second = run["requests_s"]
    assert first >= 0.3 > second > 0


def test_a_server_without_the_api_is_still_timed_to_ready(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "health").write_text("ok")
    cmd = f"{sys.executable} -m http.server {{port}} --bind 127.0.0.1 --directory {site}"
    rc = bs.main(["--server-cmd", cmd, "--warm-runs", "0", "--first-requests", "--timeout", "60",
                  "--out", str(tmp_path / "out")])
    assert rc == 0
    (run,) = _only_json(tmp_path / "out")["runs"]
    assert run["ready"] and "requests_s" not in run and "404" in run["requests_error"]
