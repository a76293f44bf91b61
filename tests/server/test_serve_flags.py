"""A pasted `vllm serve` command: serve.py takes vLLM's spellings (positional model, --block-size, --tokenizer,
--chat-template, --max-logprobs, --response-role, --generation-config, --override-generation-config, CORS,
parallelism and no-op flags) or stops with a message that says why. Parse-level checks, then one live server
started from the flags the way run_server starts it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from harness import LiveServer, assert_error, sse_events

import ie_jax
from engine.async_llm import AsyncLLM
from engine.serve_flags import app_kwargs, served_tokenizer
from ie_jax.tokenizer import ByteTokenizer, HFTokenizer
from ie_jax.weights import save_hf_checkpoint

_spec = importlib.util.spec_from_file_location("serve", Path(__file__).resolve().parents[2] / "scripts" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

# role initial + content per message, ">" to prompt the reply: byte-level, so one token per character
TEMPLATE = ("{% for m in messages %}{{ m['role'][0] + ':' + m['content'] + '|' }}{% endfor %}"
            "{% if add_generation_prompt %}>{% endif %}")
MESSAGES = [{"role": "user", "content": "hi"}]


def parse_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        serve.parse_args(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


# --- parse level ---------------------------------------------------------------------------------------------

def test_model_positional_or_flag(capsys):
    assert serve.parse_args([]).model == serve.DEFAULT_MODEL  # no arguments: still the embedded model
    for argv in (["tiny-llama"], ["--model", "tiny-llama"], ["--port", "9", "tiny-llama"],
                 ["tiny-llama", "--model", "tiny-llama"]):
        args = serve.parse_args(argv)
        assert (args.model, args.served_model_name) == ("tiny-llama", ["tiny-llama"]), argv
    err = parse_error(capsys, ["tiny-llama", "--model", "tiny-gpt2"])
    assert "'tiny-llama' (positional)" in err and "--model 'tiny-gpt2'" in err


def test_block_size_is_page_size(capsys):
    assert serve.parse_args(["--block-size", "32"]).page_size == serve.parse_args(["--page-size", "32"]).page_size == 32
    assert "invalid choice: 12" in parse_error(capsys, ["--block-size", "12"])


def test_token_buckets_flag(capsys):
    args = serve.parse_args(["--token-buckets", "1024, 64,8,64", "--max-num-batched-tokens", "1024"])
    assert args.token_buckets == (8, 64, 1024)  # sorted, repeats dropped
    assert serve.parse_args([]).token_buckets is None  # default: powers of two
    assert "separated by commas" in parse_error(capsys, ["--token-buckets", "8;64"])
    assert "positive token counts" in parse_error(capsys, ["--token-buckets", "0,64"])
    err = parse_error(capsys, ["--token-buckets", "8,512", "--max-num-batched-tokens", "1024"])
    assert "largest must reach the step's token budget (1024" in err
    assert serve.parse_args(["--calculate-kv-scales", "--kv-cache-dtype", "fp8"]).calculate_kv_scales
    assert not serve.parse_args([]).calculate_kv_scales


def test_tokenizer_flag(tmp_path, capsys):
    ByteTokenizer().save_pretrained(tmp_path / "tok")
    assert serve.parse_args(["--tokenizer", str(tmp_path / "tok")]).tokenizer == str(tmp_path / "tok")
    assert "no tokenizer.json" in parse_error(capsys, ["--tokenizer", str(tmp_path)])


def test_served_tokenizer_reads_the_directory_and_keeps_the_models_eos(tmp_path):
    ByteTokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=263))
    args = SimpleNamespace(tokenizer=str(tmp_path / "tok"), model=str(tmp_path / "model"), chat_template=TEMPLATE)
    tok = served_tokenizer(args, model, ByteTokenizer())
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_token_ids == (ByteTokenizer.EOS, ByteTokenizer.END, 7, 9)
    assert tok.chat_templates == {"default": TEMPLATE}
    assert tok.apply_chat_template(MESSAGES) == "u:hi|>"
    with pytest.raises(ValueError, match="beyond the model's vocabulary of 100"):
        served_tokenizer(args, SimpleNamespace(config=SimpleNamespace(vocab_size=100)), None)


def test_chat_template_file_or_text(tmp_path, capsys):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    assert serve.parse_args(["--chat-template", str(path)]).chat_template == TEMPLATE
    assert serve.parse_args(["--chat-template", TEMPLATE]).chat_template == TEMPLATE
    assert serve.parse_args(["--chat-template", "{{ 'a' }}\\n"]).chat_template == "{{ 'a' }}\n"  # escapes decoded
    assert "--chat-template: '/" in parse_error(capsys, ["--chat-template", str(tmp_path / "missing.jinja")])
    assert "--chat-template: chat template does not compile" in parse_error(capsys, ["--chat-template", "{% if %}"])


def test_max_logprobs_and_response_role(capsys):
    args = serve.parse_args([])
    assert (args.max_logprobs, args.response_role) == (20, "assistant")
    args = serve.parse_args(["--max-logprobs", "3", "--response-role", "bot"])
    assert (args.max_logprobs, args.response_role) == (3, "bot")
    assert app_kwargs(args)["response_role"] == "bot"
    assert "--max-logprobs=-1 must be >= 0" in parse_error(capsys, ["--max-logprobs", "-1"])
    assert "--response-role must not be empty" in parse_error(capsys, ["--response-role", ""])


def test_cors_flags(capsys):
    assert app_kwargs(serve.parse_args([]))["cors"] is None  # no CORS unless --allowed-origins names origins
    assert app_kwargs(serve.parse_args(["--allowed-origins", '["*"]']))["cors"] == dict(
        allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], allow_credentials=False)
    args = serve.parse_args(["--allowed-origins", '["http://a", "http://b"]', "--allowed-methods", '["POST"]',
                             "--allowed-headers", '["x-key"]', "--allow-credentials"])
    assert app_kwargs(args)["cors"] == dict(
        allow_origins=["http://a", "http://b"], allow_methods=["POST"], allow_headers=["x-key"], allow_credentials=True)
    assert "is not a JSON list of strings" in parse_error(capsys, ["--allowed-origins", "http://a"])


def test_parallelism_is_one_gpu(capsys):
    args = serve.parse_args(["-tp", "1", "--pipeline-parallel-size", "1"])
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (1, 1)
    for argv in (["--tensor-parallel-size", "2"], ["-tp", "8"], ["-pp", "2"]):
        assert "serves on one GPU" in parse_error(capsys, argv)


def test_compatibility_flags_are_noted(capsys):
    assert serve.compat_notes(serve.parse_args([])) == []
    flags = ["--trust-remote-code", "--enable-chunked-prefill", "--disable-log-requests",
             "--enforce-eager", "--swap-space", "4", "--disable-frontend-multiprocessing"]
    notes = serve.compat_notes(serve.parse_args(flags))
    assert sorted(n.split(":")[0] for n in notes) == sorted(f for f in flags if f.startswith("--"))
    assert "always on" in parse_error(capsys, ["--no-enable-chunked-prefill"])
    # --disable-log-stats does something here: no stats line
    assert app_kwargs(serve.parse_args([]))["log_stats_interval"] == 10.0
    assert app_kwargs(serve.parse_args(["--disable-log-stats"]))["log_stats_interval"] is None
    kw = app_kwargs(serve.parse_args(["--enable-log-requests", "--max-log-len", "100"]))
    assert (kw["log_requests"], kw["max_log_len"]) == (True, 100)
    assert app_kwargs(serve.parse_args([]))["log_requests"] is False
    assert "must be >= 0" in parse_error(capsys, ["--max-log-len", "-1"])


def test_reasoning_parser_flag(capsys):
    assert app_kwargs(serve.parse_args([]))["reasoning_parser"] is None
    assert app_kwargs(serve.parse_args(["--reasoning-parser", "qwen3"]))["reasoning_parser"] == "qwen3"
    assert "invalid choice: 'granite'" in parse_error(capsys, ["--reasoning-parser", "granite"])
    assert app_kwargs(serve.parse_args([]))["grammar_in_reasoning"] is False
    args = serve.parse_args(["--structured-outputs-config", '{"enable_in_reasoning": true, "backend": "xgrammar"}'])
    assert app_kwargs(args)["grammar_in_reasoning"] is True
    assert any("whatever the backend named" in note for note in serve.compat_notes(args))
    assert "unknown keys ['disable_any_whitespace']" in parse_error(
        capsys, ["--structured-outputs-config", '{"disable_any_whitespace": true}'])
    assert "true or false" in parse_error(capsys, ["--structured-outputs-config", '{"enable_in_reasoning": 1}'])


def test_generation_config(tmp_path, capsys, monkeypatch):
    import engine.server
    monkeypatch.setattr(engine.server, "run_server", lambda args: pytest.fail("a bad config reached run_server"))
    assert serve.parse_args([]).generation_config == "auto"
    assert serve.parse_args(["--generation-config", "vllm"]).generation_config == "vllm"
    assert "give auto, vllm or a folder" in parse_error(capsys, ["--generation-config", str(tmp_path)])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "temperature": 0.6,
                                                                 "do_sample": True, "max_new_tokens": 32}))
    assert serve.parse_args(["--generation-config", str(tmp_path)]).generation_config == str(tmp_path)  # a folder
    notes = serve.compat_notes(serve.parse_args([str(tmp_path)]))
    assert notes == ["--generation-config auto: default sampling parameters from the model's generation_config.json: "
                     "{'temperature': 0.6, 'max_tokens': 32} (a request's own values win; --generation-config vllm "
                     "ignores the file)"]
    assert serve.compat_notes(serve.parse_args([str(tmp_path), "--generation-config", "vllm"])) == []
    notes = serve.compat_notes(serve.parse_args(["--generation-config", str(tmp_path), "--override-generation-config",
                                                 '{"temperature": 0.2, "top_k": 40}']))
    assert notes == [f"--generation-config {tmp_path}: default sampling parameters from {tmp_path}/generation_config"
                     f".json and --override-generation-config: {{'temperature': 0.2, 'top_k': 40, 'max_tokens': 32}} "
                     f"(a request's own values win; --generation-config vllm ignores the file)"]
    args = serve.parse_args(["--generation-config", "vllm", "--override-generation-config", '{"max_new_tokens": 5}'])
    assert args.override_generation_config == {"max_new_tokens": 5}
    assert "from --override-generation-config: {'max_tokens': 5}" in serve.compat_notes(args)[0]
    for bad in ('{"temperature": ', '[1]', "0.5"):
        assert "is not a JSON object" in parse_error(capsys, ["--override-generation-config", bad])
    for flags, word in ((["--override-generation-config", '{"max_tokens": 5}'], "keys must be among"),
                        ([str(tmp_path), "--override-generation-config", '{"top_p": 1.5}'], "top_p=1.5 must be in")):
        with pytest.raises(ValueError, match=word):
            serve.compat_notes(serve.parse_args(flags))
        with pytest.raises(SystemExit, match=f"error: .*{word}"):  # main stops before loading the model
            serve.main(flags)


# --- one live server, from the flags ---------------------------------------------------------------------------

# The served checkpoint's generation_config.json: greedy by default, at most 8 new tokens (5 once overridden)
GENERATION_CONFIG = {"bos_token_id": 257, "eos_token_id": 258, "do_sample": False, "temperature": 0.0, "top_k": 40,
                     "max_new_tokens": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flags")
    ByteTokenizer().save_pretrained(tmp / "tok")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    model, _ = ie_jax.load_model("tiny-llama", dtype="float32", seed=1)
    save_hf_checkpoint(model, model.config, tmp / "model", generation_config=GENERATION_CONFIG)  # no tokenizer
    args = serve.parse_args([str(tmp / "model"), "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "4",
                             "--max-num-batched-tokens", "32", "--block-size", "16", "--compilation-cache-dir", "",
                             "--tokenizer", str(tmp / "tok"), "--chat-template", str(tmp / "chat.jinja"),
                             "--response-role", "bot", "--max-logprobs", "3", "--override-generation-config",
                             '{"max_new_tokens": 5}', "--allowed-origins", '["http://app.example"]',
                             "--trust-remote-code", "--return-tokens-as-token-ids", "--trust-request-chat-template"])
    kwargs = app_kwargs(args)
    server = LiveServer(AsyncLLM.from_args(args), kwargs.pop("served_model_name"), **kwargs)
    yield server
    server.stop()
    server.engine.shutdown()


def test_live_tokenizer_and_chat_template(served):
    assert isinstance(served.engine.tokenizer, HFTokenizer)  # --tokenizer's files: the checkpoint has none
    own = ByteTokenizer().apply_chat_template(MESSAGES, tokenize=True)
    custom = list(b"u:hi|>")  # byte ids of TEMPLATE's rendering
    assert own != custom
    r = httpx.post(f"{served.url}/tokenize", json={"messages": MESSAGES})
    assert r.status_code == 200 and r.json()["tokens"] == custom
    r = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(custom)


def test_live_response_role(served):
    body = {"messages": MESSAGES, "max_tokens": 2}
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body)
    assert r.json()["choices"][0]["message"]["role"] == "bot"
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={**body, "stream": True}) as r:
        first = json.loads(sse_events(r)[0])
    assert first["choices"][0]["delta"] == {"role": "bot", "content": ""}


def test_live_max_logprobs(served):
    body = {"messages": MESSAGES, "max_tokens": 1, "logprobs": True}
    r = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "top_logprobs": 3})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3
    r = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "top_logprobs": 4})
    assert_error(r, 400, "max_logprobs=3")
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1, "logprobs": 4})
    assert_error(r, 400, "max_logprobs=3")


def test_live_return_tokens_as_token_ids(served):
    """--return-tokens-as-token-ids: logprobs name tokens "token_id:<id>", the ids the text decodes from; a
    request's own return_tokens_as_token_ids=false gets the tokens' text back. Offsets still count the text."""
    body = {"messages": MESSAGES, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body).json()["choices"][0]
    content = r["logprobs"]["content"]
    ids = [int(c["token"].removeprefix("token_id:")) for c in content]
    assert all(c["token"].startswith("token_id:") for c in content) and len(ids) == 4
    assert served.engine.tokenizer.decode(ids) == r["message"]["content"]
    for c in content:
        assert c["bytes"] == list(c["token"].encode()) and c["top_logprobs"][0]["token"].startswith("token_id:")
    plain = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "return_tokens_as_token_ids": False})
    texts = [c["token"] for c in plain.json()["choices"][0]["logprobs"]["content"]]
    assert texts == [served.engine.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    assert served.engine.tokenizer.decode(ids) == r["choices"][0]["text"]
    pieces = [served.engine.tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    assert lp["text_offset"] == [sum(map(len, pieces[:i])) for i in range(3)]
    assert all(key.startswith("token_id:") for top in lp["top_logprobs"] for key in top)


def test_live_request_chat_template_and_documents(served, live):
    """--trust-request-chat-template: a chat request's own template renders the prompt, with the request's
    documents; without the flag (the plain test server) such a request is a 400 that names the flag."""
    template = ("{% for d in documents %}[{{ d['text'] }}]{% endfor %}"
                "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    body = {"messages": MESSAGES, "max_tokens": 1, "chat_template": template, "documents": [{"text": "doc"}]}
    r = httpx.post(f"{served.url}/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(b"[doc]hi")
    r = httpx.post(f"{served.url}/v1/chat/completions", json={**body, "chat_template": "{% for %}"})
    assert_error(r, 400, "")  # a template that does not compile is the client's error
    r = httpx.post(f"{live.url}/v1/chat/completions", json=body)
    assert_error(r, 400, "--trust-request-chat-template")
    r = httpx.post(f"{live.url}/v1/chat/completions",
                   json={"messages": MESSAGES, "max_tokens": 1, "chat_template_kwargs": {"chat_template": template}})
    assert_error(r, 400, "--trust-request-chat-template")


def test_live_cors(served):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    r = httpx.options(f"{served.url}/v1/chat/completions", headers={"Origin": "http://app.example", **preflight})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in r.headers
    r = httpx.options(f"{served.url}/v1/chat/completions", headers={"Origin": "http://other.example", **preflight})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{served.url}/v1/models", headers={"Origin": "http://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"


def test_live_generation_config_defaults(served):
    """The checkpoint's generation_config.json (temperature 0, top_k 40, max_new_tokens 8, overridden to 5) fills
    the fields a request leaves out: it is greedy and stops after 5 tokens; its own values win."""
    assert served.engine.default_sampling == served.app.state.server.default_sampling == {
        "temperature": 0.0, "top_k": 40, "max_tokens": 5}
    client, model = served.client(), served.app.state.server.model_name
    eos = {"ignore_eos": True}

    def complete(**kw):
        return client.completions.create(model=model, prompt="The quick brown fox", extra_body=eos, **kw)

    # no max_tokens (completions' own default, 16, is above the cap), or more than the cap: 5 tokens
    unset = [complete(seed=seed) for seed in (1, 2, 3)]
    for out in [*unset, complete(max_tokens=20)]:
        assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    assert complete(max_tokens=3).usage.completion_tokens == 3  # a smaller ask wins
    # the default temperature 0: whatever the seed, the greedy text of an explicit temperature=0 request...
    greedy = complete(temperature=0).choices[0].text
    assert [out.choices[0].text for out in unset] == [greedy] * 3
    # ...where the API's default (1.0), asked for explicitly, samples
    sampled = {complete(temperature=1.0, seed=seed).choices[0].text for seed in (1, 2, 3)}
    assert len(sampled) > 1 and greedy not in sampled
    chat = client.chat.completions.create(model=model, messages=MESSAGES, extra_body=eos)  # chat: no max_tokens
    assert chat.usage.completion_tokens == 5 and chat.choices[0].finish_reason == "length"
    again = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=5,
                                           extra_body=eos)
    assert chat.choices[0].message.content == again.choices[0].message.content


def test_speculative_config_flag(capsys):
    args = serve.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert args.speculative_config == {"method": "ngram", "num_speculative_tokens": 3}
    assert serve.parse_args([]).speculative_config is None
    assert "is not a JSON object" in parse_error(capsys, ["--speculative-config", "ngram"])
    assert "only 'ngram'" in parse_error(capsys, ["--speculative-config", '{"method": "eagle"}'])
    assert "'nope'" in parse_error(capsys, ["--speculative-config", '{"nope": 1}'])
    assert ">= 1" in parse_error(capsys, ["--speculative-config", '{"num_speculative_tokens": 0}'])
