"""Start-up time of `scripts/serve.py`: from launch to the first 200 on /health, cold and then warm.

    python scripts/bench_startup.py -- --model llama-3-8b --load-format dummy --dtype bfloat16 \
        --max-num-seqs 256 --max-num-batched-tokens 8192 --max-model-len 2048

Everything after `--` goes to serve.py. Each start is its own process on a fresh port; the first uses an empty
compilation cache directory (cold), the later ones the same directory (warm: XLA's persistent cache holds the
step executables). The server is stopped once it answers. A server that exits, or stays silent past --timeout,
is reported with the tail of its log, and the script exits non-zero. Writes one JSON and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

SERVE = Path(__file__).with_name("serve.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_requests(base: str, count: int = 2, timeout: float = 120.0) -> list[float]:
    """Seconds each of `count` one-after-another completions (8 tokens, the first served model) took, right after
    ready: the first one also waits for any first run the server still owes (it primes in its idle time)."""
    with urllib.request.urlopen(f"{base}/v1/models", timeout=timeout) as r:
        model = json.load(r)["data"][0]["id"]
    body = json.dumps(dict(model=model, prompt="The capital of France is", max_tokens=8)).encode()
    took = []
    for _ in range(count):
        req = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=timeout) as r:
            json.load(r)
        took.append(time.perf_counter() - t0)
    return took


def time_to_ready(cmd: list[str], url: str, timeout: float, log_path: str, probe=None) -> dict:
    """Launch cmd, poll url every 0.2 s until it answers 200; then run probe(), if given (its result is stored as
    `requests_s`), and stop the process. Returns seconds to ready, or the reason it never got there (exit code or
    timeout) with the log's last lines."""
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        result = None
        try:
            while result is None:
                if proc.poll() is not None:
                    result = dict(ready=False, why=f"exited with code {proc.returncode}")
                elif time.perf_counter() - t0 > timeout:
                    result = dict(ready=False, why=f"not ready after {timeout:.0f} s")
                else:
                    try:
                        with urllib.request.urlopen(url, timeout=1) as r:
                            if r.status == 200:
                                result = dict(ready=True, seconds=time.perf_counter() - t0)
                    except (urllib.error.URLError, ConnectionError, TimeoutError):
                        time.sleep(0.2)
            if result["ready"] and probe is not None:
                try:
                    result["requests_s"] = probe()
                except (urllib.error.URLError, ConnectionError, TimeoutError, KeyError, ValueError) as e:
                    result["requests_error"] = f"{type(e).__name__}: {e}"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    lines = Path(log_path).read_text(errors="replace").splitlines()
    if not result["ready"]:
        result["log_tail"] = lines[-15:]
    else:  # serve.py's own account of where the time went (model load, warm-up)
        result["log"] = [line for line in lines if line.startswith(("model ", "engine warm-up"))]
    return result


def start_all(args, serve_args: list[str], cache_dir: str) -> list[dict]:
    """The cold start, then --warm-runs warm ones on the same cache; stops at the first that fails."""
    runs = []
    for i in range(1 + args.warm_runs):
        port = free_port()
        if args.server_cmd:
            cmd = args.server_cmd.format(port=port, cache_dir=cache_dir).split()
        else:
            cmd = [sys.executable, str(SERVE), *serve_args, "--port", str(port), "--compilation-cache-dir", cache_dir]
        kind = "cold" if i == 0 else "warm"
        log_path = os.path.join(tempfile.gettempdir(), f"ie-jax-startup-{os.getpid()}-{i}.log")
        base = f"http://127.0.0.1:{port}"
        probe = (lambda: first_requests(base)) if args.first_requests else None
        r = time_to_ready(cmd, f"{base}/health", args.timeout, log_path, probe)
        runs.append(dict(kind=kind, **r))
        print(f"{kind}: " + (f"ready in {r['seconds']:.1f} s" if r["ready"] else f"FAILED ({r['why']})")
              + (f"; first requests {', '.join(f'{x:.2f}' for x in r['requests_s'])} s" if "requests_s" in r else "")
              + (f"; requests failed ({r['requests_error']})" if "requests_error" in r else ""), flush=True)
        for line in r.get("log", []):
            print("   ", line, flush=True)
        if not r["ready"]:
            print("\n".join(r["log_tail"]), file=sys.stderr)
            break
    return runs


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warm-runs", type=int, default=1, help="starts after the cold one, on the same cache")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a start may take before it counts as failed")
    ap.add_argument("--cache-dir", default=None, help="compilation cache directory (default: a new temporary one)")
    ap.add_argument("--server-cmd", default=None,
                    help="the server command, with {port} and {cache_dir} placeholders (default: serve.py with the "
                         "arguments after --, --port and --compilation-cache-dir)")
    ap.add_argument("--first-requests", action="store_true",
                    help="once ready, time two completions of 8 tokens one after the other (the server runs its "
                         "executables' first runs in idle time, so the first request may wait for one)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(own)
    if any(a in ("--port", "--compilation-cache-dir") or a.startswith(("--port=", "--compilation-cache-dir="))
           for a in serve_args):
        ap.error("--port and --compilation-cache-dir are chosen by this script; leave them out after --")
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="ie-jax-startup-cache-")
    try:
        runs = start_all(args, serve_args, cache_dir)
    finally:
        if not args.cache_dir:  # ours: removed with what the starts compiled into it
            shutil.rmtree(cache_dir, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"startup_{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(bench="startup", serve_args=serve_args, server_cmd=args.server_cmd, runs=runs,
                       commit=os.environ.get("IE_JAX_COMMIT", ""), date=time.strftime("%Y-%m-%d %H:%M")), f, indent=1)
    print(f"wrote {path}")
    return 0 if all(r["ready"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
