"""Drives a softprompt server with the official `openai` Python client.

Usage: python drive.py BASE_URL PLAN.json

PLAN.json is a list of calls, each {"kind": ..., "args": {...}}:
  models                      client.models.list()
  model                       client.models.retrieve(args["model"])
  completion / chat           client.completions.create(**args) / client.chat.completions.create(**args)
  completion_stream / chat_stream   the same with stream=True: every chunk collected
A call may carry its own "api_key" (default "test-token").
Prints one JSON list to stdout: per call the response as a dict (`model_dump()`), a list of
chunk dicts for streams, or {"error": {"status", "class", "body"}} when the client raised.
The Rust test (tests/openai_client.rs) makes the assertions.
"""
import json
import sys

import openai


def run(client, call):
    kind, args = call["kind"], call.get("args", {})
    if kind == "models":
        return [m.model_dump() for m in client.models.list()]
    if kind == "model":
        return client.models.retrieve(args["model"]).model_dump()
    if kind == "completion":
        return client.completions.create(**args).model_dump()
    if kind == "chat":
        return client.chat.completions.create(**args).model_dump()
    if kind == "completion_stream":
        return [c.model_dump() for c in client.completions.create(stream=True, **args)]
    if kind == "chat_stream":
        return [c.model_dump() for c in client.chat.completions.create(stream=True, **args)]
    raise ValueError(f"unknown call kind {kind}")


def main():
    base_url, plan_path = sys.argv[1], sys.argv[2]
    with open(plan_path) as f:
        plan = json.load(f)
    # No retries: a 429 or 5xx must reach the test as it is.
    def client(api_key):
        return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)

    out = []
    for call in plan:
        try:
            out.append(run(client(call.get("api_key", "test-token")), call))
        except openai.APIStatusError as e:
            out.append({"error": {"status": e.status_code, "class": type(e).__name__, "body": e.body}})
        except openai.APIError as e:
            # Errors sent inside a stream (no status code).
            out.append({"error": {"status": None, "class": type(e).__name__, "body": e.body, "message": e.message}})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
