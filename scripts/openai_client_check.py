#!/usr/bin/env python3
"""Drive a running `tuner serve` with the official `openai` Python client and assert on what
it gets back; used by tests/serve.rs (run with /root/.cache/tuner/venv/bin/python, `openai`
pinned in scripts/bootstrap's test_pkgs).

The test starts the server on a tiny fixture model with --served-model-name and an API key,
computes the expected greedy and seeded outputs with tuner's engine in-process, and writes
them to the --expect JSON file:

  {"prompt", "prompt_tokens", "messages",
   "completion": {"text", "tokens", "finish_reason"},  # greedy, max_tokens 8
   "chat":       {"text", "tokens", "finish_reason"},  # greedy, max_completion_tokens 8
   "chat3":      {"text", "tokens", "finish_reason"},  # greedy, max_completion_tokens 3
   "sampled": TEXT,                                    # temperature 1, seed 7, max_tokens 8
   "stop": STR, "stopped": TEXT,                       # greedy cut before the stop string
   "follow_up": TEXT, "after_follow_up": {...}}        # chat + its answer + this user turn

Every check raises on a mismatch; the last stdout line is {"checks": [names]}.
"""

import argparse
import json

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--expect", required=True)
    a = ap.parse_args()
    with open(a.expect) as f:
        want = json.load(f)
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key, max_retries=0, timeout=60)
    model = a.model
    checks = []

    def check(name, got, expected):
        if got != expected:
            raise AssertionError(f"{name}: got {got!r}, expected {expected!r}")
        if name not in checks:
            checks.append(name)

    def refused(name, error_class, call, code=None, param=None):
        try:
            call()
        except error_class as e:
            check(name, (getattr(e, "code", None), getattr(e, "param", None)), (code, param))
            return
        raise AssertionError(f"{name}: no {error_class.__name__}")

    # Models.
    check("models.list", [m.id for m in client.models.list()], [model])
    check("models.retrieve", client.models.retrieve(model).id, model)

    # Completions: greedy equals the engine, usage in tokens.
    prompt, c_want = want["prompt"], want["completion"]
    c = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    check("completions", (c.choices[0].text, c.choices[0].finish_reason), (c_want["text"], c_want["finish_reason"]))
    check("completions.usage", (c.usage.prompt_tokens, c.usage.completion_tokens),
          (want["prompt_tokens"], c_want["tokens"]))
    check("completions.model", c.model, model)

    # Streamed completions add up to the same text; the usage chunk comes last.
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    check("completions.stream", text, c_want["text"])
    check("completions.stream.usage", chunks[-1].usage.completion_tokens, c_want["tokens"])

    # Chat with max_completion_tokens; the default fields OpenAI clients send are accepted.
    messages, ch_want = want["messages"], want["chat"]
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8, temperature=0,
                                       n=1, user="openai_client_check", logit_bias={}, seed=3,
                                       response_format={"type": "text"})
    msg = r.choices[0].message
    check("chat", (msg.role, msg.content, r.choices[0].finish_reason),
          ("assistant", ch_want["text"], ch_want["finish_reason"]))
    check("chat.usage", r.usage.completion_tokens, ch_want["tokens"])
    r3 = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=3, temperature=0)
    check("chat.max_completion_tokens", (r3.choices[0].message.content, r3.usage.completion_tokens,
                                         r3.choices[0].finish_reason),
          (want["chat3"]["text"], want["chat3"]["tokens"], want["chat3"]["finish_reason"]))

    # A conversation that carries the response's message back (with its null fields) goes on.
    follow = messages + [msg.model_dump(), {"role": "user", "content": want["follow_up"]}]
    r = client.chat.completions.create(model=model, messages=follow, max_completion_tokens=8, temperature=0)
    check("chat.follow_up", r.choices[0].message.content, want["after_follow_up"]["text"])

    # Streamed chat: the role first, then deltas that add up to the non-streamed content.
    stream = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8, temperature=0,
                                            stream=True)
    chunks = list(stream)
    check("chat.stream.role", chunks[0].choices[0].delta.role, "assistant")
    check("chat.stream", "".join(ch.choices[0].delta.content or "" for ch in chunks), msg.content)
    check("chat.stream.finish", chunks[-1].choices[0].finish_reason, ch_want["finish_reason"])

    # Stop strings cut the text before them.
    s = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, stop=[want["stop"]])
    check("stop", (s.choices[0].text, s.choices[0].finish_reason), (want["stopped"], "stop"))

    # A seed reproduces the draw, and the draw is the engine's.
    texts = [client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=1, seed=7)
             .choices[0].text for _ in range(2)]
    check("seed", texts, [want["sampled"], want["sampled"]])

    # A field the server does not know is ignored (the server logs a warning).
    r = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8, temperature=0,
                                       extra_body={"tuner_test_unknown": {"x": 1}})
    check("unknown field ignored", r.choices[0].message.content, ch_want["text"])

    # Refusals come back as the client's typed errors.
    refused("json_object refused", openai.BadRequestError,
            lambda: client.chat.completions.create(model=model, messages=messages, max_completion_tokens=2,
                                                   response_format={"type": "json_object"}),
            param="response_format")
    refused("n > 1 refused", openai.BadRequestError,
            lambda: client.completions.create(model=model, prompt=prompt, max_tokens=2, n=2), param="n")
    refused("model_not_found", openai.NotFoundError,
            lambda: client.chat.completions.create(model="no-such-model", messages=messages),
            code="model_not_found", param="model")
    refused("models.retrieve not found", openai.NotFoundError,
            lambda: client.models.retrieve("no-such-model"), code="model_not_found", param="model")
    wrong = openai.OpenAI(base_url=a.base_url, api_key=a.api_key + "-wrong", max_retries=0, timeout=60)
    refused("wrong api key", openai.AuthenticationError, lambda: wrong.models.list(), code="invalid_api_key")

    print(json.dumps({"checks": checks}))


if __name__ == "__main__":
    main()
