# Reference experiment (not part of the product): prompt tuning SmolLM2-135M-Instruct on the
# movie snippets with torch on a GPU, to learn how many steps the recipe needs.
import json, math, os, random, sys, time
import torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.optimization import Adafactor

torch.manual_seed(0); random.seed(0)
dev = "cuda"
d = "/tmp/m"
tok = AutoTokenizer.from_pretrained(d, gguf_file="model.gguf")
model = AutoModelForCausalLM.from_pretrained(d, gguf_file="model.gguf", torch_dtype=torch.float32).to(dev).eval()
for p in model.parameters(): p.requires_grad_(False)
emb = model.get_input_embeddings()
rows = []
for line in open(os.path.join(os.path.dirname(__file__), "movie.txt"), encoding="utf-8"):
    parts = line.rstrip("\r\n").split("\t", 2)
    if len(parts) < 3: continue
    s = float(parts[1])
    if s == 0: continue
    rows.append((parts[2].strip(), int(s > 0)))
random.shuffle(rows)
n = len(rows); ntr = round(n * .8); ndv = round(n * .1)
train, dv, test = rows[:ntr], rows[ntr:ntr + ndv], rows[ntr + ndv:]
T = "Review: {text}\nSentiment:"
labels = [tok.encode(" negative", add_special_tokens=False), tok.encode(" positive", add_special_tokens=False)]
print("label ids", labels, flush=True)
lab = torch.tensor([l[0] for l in labels], device=dev)
pad = tok.pad_token_id if tok.pad_token_id is not None else 2

def batchify(ex, prompt):
    ids = [tok.encode(T.format(text=t), add_special_tokens=False) for t, _ in ex]
    s = max(map(len, ids)); B = len(ids)
    x = torch.full((B, s), pad, device=dev); m = torch.zeros((B, s), device=dev)
    for i, r in enumerate(ids):
        x[i, s - len(r):] = torch.tensor(r, device=dev); m[i, s - len(r):] = 1
    e = emb(x)
    if prompt is not None:
        e = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), e], 1)
        m = torch.cat([torch.ones((B, prompt.shape[0]), device=dev), m], 1)
    out = model(inputs_embeds=e, attention_mask=m).logits[:, -1]  # next token after the input
    return F.log_softmax(out.float(), -1)[:, lab]  # [B, 2]

@torch.no_grad()
def acc(split, prompt, limit=None):
    split = split[:limit] if limit else split
    right = 0
    for i in range(0, len(split), 64):
        ex = split[i:i + 64]
        pred = batchify(ex, prompt).argmax(-1).tolist()
        right += sum(int(p == y) for p, (_, y) in zip(pred, ex))
    return right / len(split)

t0 = time.time()
print("zero-shot test acc", acc(test, None), "dev", acc(dv, None), f"{time.time()-t0:.1f}s", flush=True)

def init(kind, N=20):
    g = torch.Generator().manual_seed(1)
    if kind == "random":
        return (torch.rand((N, emb.weight.shape[1]), generator=g) - 0.5).to(dev)
    ids = torch.randperm(5000, generator=g)[:N] + 1
    P = emb.weight[ids.to(dev)].clone()
    if kind == "class":
        for j, l in enumerate(labels): P[j] = emb.weight[torch.tensor(l, device=dev)].mean(0)
    return P

results = {}
configs = [(k, lr, bs) for (k, lr, bs) in [("class", .3, 16), ("random", .3, 16), ("class", 1.0, 16), ("class", .3, 32)]]
for kind, lr, bs in configs:
    P = torch.nn.Parameter(init(kind))
    opt = Adafactor([P], lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, decay_rate=-0.8, weight_decay=1e-5, clip_threshold=1.0)
    curve = []; t0 = time.time(); order = list(range(len(train))); random.Random(2).shuffle(order); pos = 0
    for step in range(1, 601):
        if pos + bs > len(order): random.Random(step).shuffle(order); pos = 0
        ex = [train[i] for i in order[pos:pos + bs]]; pos += bs
        lp = batchify(ex, P)
        y = torch.tensor([yy for _, yy in ex], device=dev)
        # full-vocab CE at the label token (what our objective trains)
        loss = -lp.gather(1, y[:, None]).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if step in (25, 50, 75, 100, 150, 200, 300, 400, 600):
            a = acc(dv, P.detach(), 300)
            curve.append((step, round(loss.item(), 4), a))
            print(kind, lr, bs, step, round(loss.item(), 4), "dev300", a, f"{time.time()-t0:.0f}s", flush=True)
        if step in (100, 200, 600):
            print("   test acc at", step, acc(test, P.detach()), flush=True)
    results[f"{kind}-{lr}-{bs}"] = curve
json.dump(results, open(os.environ.get("OUT", "/tmp") + "/pt_results.json", "w"))
