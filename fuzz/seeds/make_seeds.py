#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/seeds/<target>/): small VALID inputs,
so that the fuzzers start from files the loaders accept and mutate from there.

Standard library only (no numpy, no gguf package). Run from anywhere:

    python3 fuzz/seeds/make_seeds.py

The files are deterministic; crates/softprompt/tests/fuzz_regressions.rs (and, for the server
requests, crates/softprompt-serve/tests/fuzz_regressions.rs) checks that every seed still
loads, so a format change that invalidates them is noticed.
"""
import base64
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def values(n, k):
    """n deterministic small floats (no randomness: seeds must not change between runs)."""
    return [((i * 37 + k * 11) % 17 - 8) / 40.0 for i in range(n)]


# ---------------------------------------------------------------- GGUF (v3, little-endian)
GGUF_U32, GGUF_I32, GGUF_F32, GGUF_BOOL, GGUF_STR, GGUF_ARR, GGUF_U64 = 4, 5, 6, 7, 8, 9, 10
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
ALIGN = 32


def gstr(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def gval(kind, v):
    if kind == GGUF_U32:
        return struct.pack("<I", v)
    if kind == GGUF_I32:
        return struct.pack("<i", v)
    if kind == GGUF_U64:
        return struct.pack("<Q", v)
    if kind == GGUF_F32:
        return struct.pack("<f", v)
    if kind == GGUF_BOOL:
        return struct.pack("<B", 1 if v else 0)
    if kind == GGUF_STR:
        return gstr(v)
    if kind == GGUF_ARR:
        elem, items = v
        return struct.pack("<IQ", elem, len(items)) + b"".join(gval(elem, x) for x in items)
    raise ValueError(kind)


def f16_bytes(xs):
    return b"".join(struct.pack("<e", x) for x in xs)


def q8_0_bytes(xs):
    out = b""
    for b in range(0, len(xs), 32):
        blk = xs[b:b + 32]
        amax = max(abs(x) for x in blk) or 1.0
        d = amax / 127.0
        out += struct.pack("<e", d) + bytes((round(x / d) & 0xFF) for x in blk)
    return out


def q4_0_bytes(xs):
    out = b""
    for b in range(0, len(xs), 32):
        blk = xs[b:b + 32]
        amax = max(blk, key=abs) or 1.0
        d = amax / -8.0
        q = [min(15, max(0, int(x / d + 8.5))) for x in blk]
        out += struct.pack("<e", d) + bytes(q[i] | (q[i + 16] << 4) for i in range(16))
    return out


def tensor_bytes(ggml, xs):
    if ggml == GGML_F32:
        return b"".join(struct.pack("<f", x) for x in xs)
    if ggml == GGML_F16:
        return f16_bytes(xs)
    if ggml == GGML_Q8_0:
        return q8_0_bytes(xs)
    if ggml == GGML_Q4_0:
        return q4_0_bytes(xs)
    raise ValueError(ggml)


def gguf(metadata, tensors):
    """metadata: [(key, kind, value)]; tensors: [(name, [rows, cols] or [n], ggml type)]."""
    head = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(metadata))
    for k, kind, v in metadata:
        head += gstr(k) + struct.pack("<I", kind) + gval(kind, v)
    data = b""
    for i, (name, shape, ggml) in enumerate(tensors):
        n = 1
        for s in shape:
            n *= s
        blob = tensor_bytes(ggml, values(n, i))
        while len(data) % ALIGN:
            data += b"\0"
        offset = len(data)
        data += blob
        # GGUF lists dimensions innermost first.
        head += gstr(name) + struct.pack("<I", len(shape))
        head += b"".join(struct.pack("<Q", s) for s in reversed(shape))
        head += struct.pack("<IQ", ggml, offset)
    while len(head) % ALIGN:
        head += b"\0"
    return head + data


def llama_gguf(hidden, heads, ff, types, pre):
    tokens = ["<|endoftext|>", "<|im_start|>", "a", "b", "c", "ab", "\u0120", "\u0120a"]
    merges = ["a b", "\u0120 a"]
    meta = [
        ("general.architecture", GGUF_STR, "llama"),
        ("general.name", GGUF_STR, "tiny"),
        ("llama.context_length", GGUF_U32, 64),
        ("llama.embedding_length", GGUF_U32, hidden),
        ("llama.feed_forward_length", GGUF_U32, ff),
        ("llama.block_count", GGUF_U32, 1),
        ("llama.attention.head_count", GGUF_U32, heads),
        ("llama.attention.head_count_kv", GGUF_U32, heads),
        ("llama.rope.freq_base", GGUF_F32, 10000.0),
        ("llama.rope.dimension_count", GGUF_U32, hidden // heads),
        ("llama.attention.layer_norm_rms_epsilon", GGUF_F32, 1e-5),
        ("tokenizer.ggml.model", GGUF_STR, "gpt2"),
        ("tokenizer.ggml.pre", GGUF_STR, pre),
        ("tokenizer.ggml.tokens", GGUF_ARR, (GGUF_STR, tokens)),
        ("tokenizer.ggml.token_type", GGUF_ARR, (GGUF_I32, [3, 3, 1, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.merges", GGUF_ARR, (GGUF_STR, merges)),
        ("tokenizer.ggml.bos_token_id", GGUF_U32, 1),
        ("tokenizer.ggml.eos_token_id", GGUF_U32, 0),
        ("tokenizer.ggml.add_bos_token", GGUF_BOOL, False),
    ]
    v = len(tokens)
    t = types
    tensors = [
        ("token_embd.weight", [v, hidden], t["embd"]),
        ("blk.0.attn_norm.weight", [hidden], GGML_F32),
        ("blk.0.attn_q.weight", [hidden, hidden], t["attn"]),
        ("blk.0.attn_k.weight", [hidden, hidden], t["attn"]),
        ("blk.0.attn_v.weight", [hidden, hidden], t["attn"]),
        ("blk.0.attn_output.weight", [hidden, hidden], t["attn"]),
        ("blk.0.ffn_norm.weight", [hidden], GGML_F32),
        ("blk.0.ffn_gate.weight", [ff, hidden], t["ffn"]),
        ("blk.0.ffn_up.weight", [ff, hidden], t["ffn"]),
        ("blk.0.ffn_down.weight", [hidden, ff], t["ffn"]),
        ("output_norm.weight", [hidden], GGML_F32),
    ]
    return gguf(meta, tensors)


put("gguf", "tiny_f32_f16.gguf",
    llama_gguf(8, 2, 16, {"embd": GGML_F32, "attn": GGML_F16, "ffn": GGML_F32}, "smollm"))
put("gguf", "tiny_q8_q4.gguf",
    llama_gguf(32, 4, 32, {"embd": GGML_F16, "attn": GGML_Q8_0, "ffn": GGML_Q4_0}, "gpt2"))


# ---------------------------------------------------------------- safetensors
def safetensors(tensors, metadata=None):
    """tensors: [(name, dtype, shape, raw bytes)]."""
    header, data = {}, b""
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    while len(h) % 8:
        h += b" "
    return struct.pack("<Q", len(h)) + h + data


def f32(xs):
    return b"".join(struct.pack("<f", x) for x in xs)


def adapter(config, weights):
    c = json.dumps(config).encode()
    return struct.pack("<H", len(c)) + c + weights


causal = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4,
          "token_dim": 8, "num_transformer_submodules": 1, "num_layers": 2,
          "base_model_name_or_path": "tiny", "prompt_tuning_init": "RANDOM", "inference_mode": True,
          "peft_version": "0.21.2"}
put("peft_adapter", "causal_f32",
    adapter(causal, safetensors([("prompt_embeddings", "F32", [4, 8], f32(values(32, 0)))], {"format": "pt"})))
seq2seq = dict(causal, task_type="SEQ_2_SEQ_LM", num_virtual_tokens=2, num_transformer_submodules=2)
put("peft_adapter", "seq2seq_f16",
    adapter(seq2seq, safetensors([("prompt_embeddings", "F16", [4, 8], f16_bytes(values(32, 1)))])))
minimal = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 1, "token_dim": 2}
put("peft_adapter", "minimal_bf16",
    adapter(minimal, safetensors([("prompt_embeddings", "BF16", [1, 2], b"\x80\x3f\x00\xc0")])))

# ---------------------------------------------------------------- checkpoint
header = {"version": 1, "step": 3, "epoch": 0, "position": 3,
          "best_dev_loss": "3ff8000000000000", "best_step": 2, "evals_since_best": 1,
          "stopped_early": False, "config_hash": "00ff",
          "optimizer_scalars": {"step": "4008000000000000"}}
put("checkpoint", "with_best_and_adafactor", safetensors([
    ("best_prompt", "F32", [2, 4], f32(values(8, 2))),
    ("optimizer.row.0", "F32", [2], f32([0.5, 0.25])),
    ("optimizer.col.0", "F32", [4], f32([0.5, 0.25, 0.125, 1.0])),
    ("prompt", "F32", [2, 4], f32(values(8, 3))),
], {"softprompt.checkpoint": json.dumps(header), "format": "pt"}))
header2 = dict(header, best_dev_loss=None, best_step=None, optimizer_scalars={})
put("checkpoint", "plain", safetensors([("prompt", "F32", [1, 2], f32([1.0, -1.0]))],
                                       {"softprompt.checkpoint": json.dumps(header2)}))

# ---------------------------------------------------------------- data sets
# First byte: control (see fuzz_targets/dataset.rs): 0 JSONL, 1 CSV, 2 TSV, +8 labels, +16 text/label.
put("dataset", "pairs_jsonl", b"\x00" + b'{"input": "2 + 2 =", "target": "4"}\n\n'
    b'{"input": "Say \\"hi\\"", "target": "hi", "extra": 1}\n{"input": "n", "target": 3}\n')
put("dataset", "pairs_csv", b"\x01" + b'input,target\n"2 + 2 =",4\r\n"Say ""hi"", please",hi\n')
put("dataset", "pairs_tsv", b"\x02" + b'\xef\xbb\xbfinput\ttarget\n2 + 2 =\t4\nSay "hi"\thi\n')
put("dataset", "labels_csv", b"\x19" + b"text,label\ngreat film,pos\nawful, positive\nbad,\" negative\"\n")
put("dataset", "labels_jsonl_skip", b"\x0c" + b'{"input": "ok", "target": "pos"}\n{"input": "x", "target": "meh"}\n')

# ---------------------------------------------------------------- BIG-bench task.json
put("bigbench", "shared_choices.json", json.dumps({
    "name": "tiny_mc", "description": "d", "task_prefix": "Answer.\n",
    "examples": [{"input": f"q{i}", "target_scores": {"yes": i % 2, "no": 1 - i % 2}} for i in range(10)],
}, indent=1))
put("bigbench", "varied_choices.json", json.dumps({
    "name": "tiny_varied", "example_output_prefix": "\nA:\n", "append_choices_to_input": False,
    "examples": [{"input": f"q{i}", "target_scores": {f"c{i}": 1, f"d{i}": 0, "e": 0.5}} for i in range(10)],
}))
put("bigbench", "text.json", json.dumps({
    "examples": [{"input": f"say {i}", "target": [str(i), f"#{i}"]} for i in range(10)]
    + [{"input": "say 0", "target": ["0", "#0"]}],
}))

# ---------------------------------------------------------------- server request bodies
# First byte: control (see fuzz_targets/server_request_input.rs): % 4: 0 POST /v1/generate,
# 1 POST /v1/classify, 2 (or 3) PUT /v1/tasks/{name} (then 1 byte name length, the name);
# bit 2 (+4): the T5 model instead of the GGUF one. The rest is the JSON body. The GGUF
# server is gguf/tiny_f32_f16.gguf (hidden size 8, 64 positions, vocabulary <|endoftext|>
# <|im_start|> a b c ab \u0120 \u0120a), the T5 one the t5-tiny fixture (hidden size 32,
# words w3..w255), each with the tasks `plain` (no labels), `cls` (template, two labels) and
# `ens` (two prompts, three labels). An upload named `swap` is kept (and so replaced).
def body(control, obj, name=None):
    head = bytes([control])
    if name is not None:
        head += bytes([len(name)]) + name.encode()
    return head + json.dumps(obj, separators=(",", ":")).encode()


def rows(n, k):
    v = values(n * 8, k)
    return [v[i * 8:(i + 1) * 8] for i in range(n)]


put("server_request", "generate_plain", body(0, {"task": "plain", "input": "ab a", "max_new_tokens": 4}))
put("server_request", "generate_all_fields", body(0, {
    "task": "cls", "input": "a b c", "max_new_tokens": 2, "temperature": 0.7,
    "stop": ["b", " a"], "seed": 7}))
put("server_request", "generate_ensemble_stop", body(0, {"task": "ens", "input": "c", "stop": "a"}))
put("server_request", "classify", body(1, {"task": "cls", "input": "ab"}))
put("server_request", "classify_ensemble", body(1, {"task": "ens", "input": "a a b"}))
put("server_request", "upload_rows", body(2, {
    "prompt": rows(2, 4),
    "task": {"template": "a {text}", "labels": ["x", "y"], "verbalizer": [" a", " b"], "note": 1}},
    name="up"))
put("server_request", "upload_ensemble", body(2, {"prompts": [rows(1, 5), rows(3, 6)]}, name="up-2.x"))
st = safetensors([("prompt_embeddings", "F32", [2, 8], f32(values(16, 7)))], {"format": "pt"})
put("server_request", "upload_safetensors", body(2, {
    "prompt": base64.b64encode(st).decode(),
    "adapter_config": {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                       "num_virtual_tokens": 2, "token_dim": 8}}, name="st"))
put("server_request", "upload_swap", body(2, {"prompt": rows(3, 8)}, name="swap"))
put("server_request", "t5_generate", body(4, {"task": "ens", "input": "w7 w8 w9", "max_new_tokens": 3}))
put("server_request", "t5_generate_plain", body(4, {"task": "plain", "input": "w10"}))
put("server_request", "t5_classify", body(5, {"task": "cls", "input": "w11 w12"}))
put("server_request", "t5_classify_ensemble", body(5, {"task": "ens", "input": "w13"}))
t5_rows = [values(32, 9 + i) for i in range(2)]
put("server_request", "t5_upload_peft_layout", body(6, {
    "prompt": t5_rows + t5_rows,
    "adapter_config": {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM",
                       "num_virtual_tokens": 2, "token_dim": 32, "num_transformer_submodules": 2},
    "task": {"template": "w3 {text}", "labels": ["x", "y"], "verbalizer": ["w4", "w5 w6"]}}, name="t5up"))
put("server_request", "t5_upload_ensemble", body(6, {"prompts": [[values(32, 10)], [values(32, 11)] * 3]}, name="t5ens"))
