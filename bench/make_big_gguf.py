#!/usr/bin/env python3
"""Writes a GGUF Llama file of real Llama-3-8B shapes with random blocks, for memory and speed
benchmarks of `--weights stored` (docs/performance.md). Not a model: the values are random.

Shapes: 32 layers, d 4096, 32 query / 8 key-value heads, FFN 14336, vocabulary 128256. The
layer matrices are random Q4_K blocks, the embedding and output matrices random Q8_0 blocks,
norms f32 ones; a byte-level BPE vocabulary of filler tokens. Every layer holds the same
random blocks (one array per shape keeps this script's memory small); the file is ~5.3 GB.

    python3 -m venv /work/venvs/gguf && /work/venvs/gguf/bin/pip install gguf numpy
    /work/venvs/gguf/bin/python bench/make_big_gguf.py /work/scratch/llama3-8b-q4k.gguf
"""
import sys

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter

LAYERS, D, HEADS, KV_HEADS, FFN, VOCAB = 32, 4096, 32, 8, 14336, 128256
HEAD_DIM = D // HEADS
rng = np.random.default_rng(0)


def q4_k(rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks `[rows, cols / 256 * 144]` bytes: f16 d, f16 dmin, 12 bytes of 6-bit
    scales and mins, 128 bytes of 4-bit values; small scales keep the activations finite."""
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    scale = np.full((rows, cols // 256), 2e-5, dtype=np.float16).view(np.uint8).reshape(rows, cols // 256, 2)
    blocks[:, :, 0:2] = scale  # d
    blocks[:, :, 2:4] = scale  # dmin
    return blocks.reshape(rows, -1)


def q8_0(rows: int, cols: int) -> np.ndarray:
    """Random Q8_0 blocks `[rows, cols / 32 * 34]` bytes: f16 d, 32 int8 values."""
    blocks = rng.integers(0, 256, size=(rows, cols // 32, 34), dtype=np.uint8)
    d = np.full((rows, cols // 32), 1e-4, dtype=np.float16).view(np.uint8).reshape(rows, cols // 32, 2)
    blocks[:, :, 0:2] = d
    return blocks.reshape(rows, -1)


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, the 256 single-byte tokens."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def main(path: str) -> None:
    w = GGUFWriter(path, "llama")
    w.add_context_length(8192)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(1e-5)
    tokens = byte_level_alphabet()
    tokens += [f"<filler_{i}>" for i in range(VOCAB - len(tokens))]
    types = [1] * VOCAB
    tokens[128000], tokens[128001] = "<|begin_of_text|>", "<|end_of_text|>"
    types[128000] = types[128001] = 3
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(128000)
    w.add_eos_token_id(128001)

    ones = np.ones(D, dtype=np.float32)
    emb = q8_0(VOCAB, D)
    w.add_tensor("token_embd.weight", emb, raw_dtype=Q.Q8_0)
    shapes = {
        "attn_q": q4_k(HEADS * HEAD_DIM, D),
        "attn_k": q4_k(KV_HEADS * HEAD_DIM, D),
        "attn_v": q4_k(KV_HEADS * HEAD_DIM, D),
        "attn_output": q4_k(D, HEADS * HEAD_DIM),
        "ffn_gate": q4_k(FFN, D),
        "ffn_up": q4_k(FFN, D),
        "ffn_down": q4_k(D, FFN),
    }
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for part, blocks in shapes.items():
            w.add_tensor(f"blk.{i}.{part}.weight", blocks, raw_dtype=Q.Q4_K)
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", emb, raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(path)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_big_gguf.py OUT.gguf")
    main(sys.argv[1])
