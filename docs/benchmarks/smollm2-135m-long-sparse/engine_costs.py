"""Plain decoding's costs at a long context: prefill tokens/s at 2k and 8k (and the part spent in
prompt attention), and the median one-token step at 200 and 7,400 cached positions.

    python engine_costs.py --data austen.jsonl --precision bf16 --cache bf16
    VERIDRAFT_ATTN_KERNEL=torch python engine_costs.py ...   # torch's attention for decoding
"""
import argparse, json, statistics, time
import torch
import veridraft
from veridraft.decode import prefill
from veridraft.models import attention, attnkernel

ap = argparse.ArgumentParser()
ap.add_argument("--data", required=True, help="austen.jsonl (the long-document data)")
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--precision", default="bf16")
ap.add_argument("--cache", default=None, choices=["fp32", "bf16"], help="default: the mode's")
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
m = veridraft.load(a.model, precision=a.precision)
net = m.net
if a.cache:
    net.cache_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.cache]
book = next(b for b in map(json.loads, open(a.data)) if b["key"] == "emma")
text = "\n\n".join(c["title"] + "\n\n" + c["text"] for c in book["chapters"][:40])
ids = m.tokenizer.encode(text)[:8300]
cpu = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
print(f"{a.model} {a.precision}, cache {net.cache_dtype}, veridraft decode kernel "
      f"{attnkernel.load() is not None}, {a.threads} threads, {cpu}", flush=True)
# the prompt's attention: the tiled path and the decode kernel's prompt rows (models/attention.py)
PROMPT_PATHS = ("attend_tiled", "attend_prompt_rows")
originals, spent = {n: getattr(attention, n) for n in PROMPT_PATHS}, [0.0]


def timing(fn):
    def timed(*args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        spent[0] += time.perf_counter() - t
        return out

    return timed


for n, fn in originals.items():
    setattr(attention, n, timing(fn))
with torch.inference_mode():
    prefill(net, ids[:600], 700)  # warm-up
    for n in (2048, 8192):
        spent[0] = 0.0
        t = time.perf_counter()
        prefill(net, ids[:n], n + 64)
        dt = time.perf_counter() - t
        print(f"prefill {n}: {dt:.2f} s = {n / dt:.0f} tokens/s (prompt attention {spent[0]:.2f} s)")
    for n, fn in originals.items():
        setattr(attention, n, fn)
    caches = {n: prefill(net, ids[:n], n + 8).cache for n in (200, 7400)}
    steps: dict[int, list[float]] = {200: [], 7400: []}
    for _ in range(3):
        for n, cache in caches.items():  # interleaved
            ts = []
            for _ in range(24):
                t = time.perf_counter()
                net(torch.tensor([ids[n]]), cache, num_logits=1)
                ts.append(time.perf_counter() - t)
                cache.truncate(n)
            steps[n].append(statistics.median(ts[4:]))
for n in steps:
    print(f"decode step @{n}: {min(steps[n]) * 1000:.2f} ms")
print(f"speed at 7,400 / speed at 200: {min(steps[200]) / min(steps[7400]):.2f}")
