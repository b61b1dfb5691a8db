"""Loads adapters written by softprompt (examples/peft_interop.rs) with PEFT and checks that
PEFT sees the same prompt and computes the fixture's logits with it.

    cargo run -p softprompt --example peft_interop -- /tmp/ours
    python3 scripts/peft_interop.py /tmp/ours   # needs torch, transformers, peft
"""
import sys, os, json
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from peft import PeftModel

ours = sys.argv[1]
fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "softprompt", "tests", "fixtures")
ok = True
for name in ["t5-tiny", "flan-t5-tiny", "llama-tiny", "gpt2-tiny"]:
    base_dir = os.path.join(fixtures, name)
    exp = load_file(os.path.join(base_dir, "expected.safetensors"))
    seq2seq = "t5" in name
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    base = cls.from_pretrained(base_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
    if name == "flan-t5-tiny":  # keep the untied head as stored (see the fixtures README)
        sd = load_file(os.path.join(base_dir, "model.safetensors"))
        base.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"].clone())
    model = PeftModel.from_pretrained(base, os.path.join(ours, name)).eval()
    table = model.prompt_encoder["default"].embedding.weight.detach()
    n = exp["prompt"].shape[0]
    d_prompt = (table[:n] - exp["prompt"]).abs().max().item()
    with torch.no_grad():
        if seq2seq:
            out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"], decoder_input_ids=exp["decoder_input_ids"])
        else:
            out = model(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"])
    d_logits = (out.logits - exp["logits"]).abs().max().item()
    good = d_prompt == 0.0 and d_logits <= 1e-4
    ok &= good
    print(json.dumps({"model": name, "prompt_max_abs_diff": d_prompt, "logits_max_abs_diff": d_logits, "ok": good}))
print("PEFT loads softprompt's adapters:", "OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
