"""What a streamed chat choice costs the server's host per token: `ChatStream.delta` (engine/reasoning.py) with
tool parsing ("auto" with the hermes or llama3_json parser), a reasoning split, or both, over a long plain reply
(the common case: tools offered, the model answers in text). Host only, so it runs anywhere; the server runs this
under the GIL it shares with the engine thread, once per token of every stream.

    python scripts/bench_chat_stream.py --tokens 2000 --repeats 3
"""
import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.reasoning import ChatMode, ChatStream, ReasoningParser  # noqa: E402
from engine.tools import ToolMode  # noqa: E402
from profile_host import current_commit, write_json  # noqa: E402

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "<", "{", "}", "then", "tool"]


def modes() -> dict[str, ChatMode]:
    tools = {"get_weather": {"type": "object"}}
    return {"hermes": ChatMode(ToolMode("auto", tools, parser="hermes")),
            "llama3_json": ChatMode(ToolMode("auto", tools, parser="llama3_json")),
            "qwen3 reasoning": ChatMode(None, ReasoningParser("qwen3"), prompt_thinks=False),
            "qwen3 reasoning + hermes": ChatMode(ToolMode("auto", tools, parser="hermes"), ReasoningParser("qwen3"))}


def reply(tokens: int, thought: bool, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [" " + rng.choice(WORDS) for _ in range(tokens)]
    if thought:  # the first third is the thought
        pieces[0], pieces[tokens // 3] = "<think>", "</think>\n\n"
    return pieces


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON path or folder (default: $OUT or benchmarks/results/)")
    args = ap.parse_args(argv)
    rows = []
    for name, mode in modes().items():
        pieces = reply(args.tokens, mode.reasoning is not None)
        best, last_quarter = float("inf"), float("inf")
        for _ in range(args.repeats):
            stream, times = ChatStream(mode), []
            for i, piece in enumerate(pieces):
                t0 = time.perf_counter()
                stream.delta(piece, "stop" if i == len(pieces) - 1 else None)
                times.append(time.perf_counter() - t0)
            best = min(best, sum(times))
            last_quarter = min(last_quarter, sum(times[-len(times) // 4:]) / (len(times) // 4))
        rows.append(dict(mode=name, tokens=args.tokens, total_ms=best * 1e3, us_per_token=best / args.tokens * 1e6,
                         last_quarter_us_per_token=last_quarter * 1e6))
        print(f"{name:26s} {best * 1e3:7.2f} ms for {args.tokens} tokens: {best / args.tokens * 1e6:5.1f} µs a token "
              f"(last quarter {last_quarter * 1e6:5.1f})")
    write_json(dict(bench="chat_stream", rows=rows, commit=current_commit(), date=time.strftime("%Y-%m-%d %H:%M"),
                    machine=os.uname().nodename), args.out, "chat_stream")


if __name__ == "__main__":
    main()
