#!/usr/bin/env python3
"""PyTorch + PEFT prompt-tuning baseline for `benches/train_step.rs`: same model shapes
(random weights), same workload, same metrics.

Workload: batch 8; decoder-only rows are 120 source + 8 target tokens (128 input tokens,
labels -100 except the 8 targets); seq2seq rows are 128 encoder tokens and 8 target tokens;
20 virtual tokens (PEFT PromptTuningConfig, random init); loss = transformers' mean token
cross-entropy. One step = forward + backward (the prompt's gradient); no optimizer update
(the Rust bench has none either). Generation: the same 8 x 128 sources, greedy, exactly 20
new tokens.

Usage: peft_baseline.py [--models smollm2,gpt2,t5-small,flan-t5-small] [--iters 2]
       [--threads 2] [--no-gen] [--device cpu|cuda|cuda:N]
Prints a markdown row and one `BENCH_JSON {...}` line per model. With a CUDA device the clock
stops after `torch.cuda.synchronize()`, the memory column is torch's peak allocated GPU memory
(`max_memory_allocated`, reset before each timed step) and the JSON line says `peak_gpu_mib`
and `device` instead of `peak_rss_mib`.
"""
import argparse
import json
import os
import time


def peak_rss_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


BATCH, INPUT, TARGET, PROMPT, NEW_TOKENS = 8, 128, 8, 20, 20


def build(name):
    import transformers as tf

    if name == "smollm2":
        cfg = tf.LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
            rope_theta=100000.0, vocab_size=49152, max_position_embeddings=8192,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        return tf.LlamaForCausalLM(cfg), False
    if name == "gpt2":
        cfg = tf.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                            vocab_size=50257, bos_token_id=50256, eos_token_id=50256,
                            pad_token_id=50256)
        return tf.GPT2LMHeadModel(cfg), False
    if name in ("t5-small", "flan-t5-small"):
        flan = name == "flan-t5-small"
        layers, heads, ff = (8, 6, 1024) if flan else (6, 8, 2048)
        cfg = tf.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=ff, num_layers=layers,
                          num_heads=heads, feed_forward_proj="gated-gelu" if flan else "relu",
                          tie_word_embeddings=not flan, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0)
        return tf.T5ForConditionalGeneration(cfg), True
    raise SystemExit(f"unknown model {name}")


def lcg_tokens(n, vocab, state):
    out = []
    for _ in range(n):
        state[0] = (state[0] * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        out.append(10 + (state[0] >> 33) % (vocab - 10))
    return out


def run(name, iters, with_gen, device="cpu"):
    import torch

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize(device)
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    t0 = time.time()
    base, seq2seq = build(name)
    base.eval()  # no dropout, as in the Rust forward
    vocab = base.config.vocab_size
    task = TaskType.SEQ_2_SEQ_LM if seq2seq else TaskType.CAUSAL_LM
    model = get_peft_model(base, PromptTuningConfig(task_type=task, num_virtual_tokens=PROMPT))
    model.to(device)
    print(f"{name}: random weights in {time.time() - t0:.1f} s", flush=True)

    state = [12345]
    rows = []
    for _ in range(BATCH):
        src = lcg_tokens(INPUT if seq2seq else INPUT - TARGET, vocab, state)
        tgt = lcg_tokens(TARGET, vocab, state)
        rows.append((src, tgt))
    if seq2seq:
        ids = torch.tensor([s for s, _ in rows])
        labels = torch.tensor([t for _, t in rows])
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        sources = ids
    else:
        ids = torch.tensor([s + t for s, t in rows])
        labels = torch.full_like(ids, -100)
        labels[:, -TARGET:] = ids[:, -TARGET:]
        batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        sources = torch.tensor([s for s, _ in rows])
    batch = {k: v.to(device) for k, v in batch.items()}
    sources = sources.to(device)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()

    step()  # warm-up
    times, peak = [], 0.0
    for _ in range(iters):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            peak_rss_reset()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
        peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                   else peak_rss_mib())
    step_s = sum(times) / len(times)

    gen_tok_s = None
    if with_gen:
        try:
            with torch.no_grad():
                sync()
                t = time.perf_counter()
                out = model.generate(input_ids=sources, attention_mask=torch.ones_like(sources),
                                     max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                     do_sample=False, num_beams=1)
                sync()
                dt = time.perf_counter() - t
            gen_tok_s = BATCH * NEW_TOKENS / dt
        except Exception as e:  # report, keep the training numbers
            print(f"{name}: generation failed: {e!r}", flush=True)

    tok_s = BATCH * INPUT / step_s
    gen = f"{gen_tok_s:.1f}" if gen_tok_s else "-"
    print(f"| {name} | torch {torch.__version__} + peft | {step_s * 1e3:.0f} | {tok_s:.0f} "
          f"| {peak:.0f} | {gen} |", flush=True)
    row = dict(
        kind="train", impl="peft", model=name, threads=torch.get_num_threads(),
        step_ms=step_s * 1e3, input_tokens_per_s=tok_s, peak_rss_mib=peak,
        gen_tokens_per_s=gen_tok_s)
    if cuda:
        row["device"] = device
        row["peak_gpu_mib"] = row.pop("peak_rss_mib")
    print("BENCH_JSON " + json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="t5-small,flan-t5-small,gpt2,smollm2")
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", 2)))
    ap.add_argument("--no-gen", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    for name in args.models.split(","):
        run(name.strip(), args.iters, not args.no_gen, args.device)


if __name__ == "__main__":
    main()
