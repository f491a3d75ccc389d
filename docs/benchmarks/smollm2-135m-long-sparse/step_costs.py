"""Step costs at a long context, interleaved in one process: a target forward over 1 / 4 / 10
rows, and one draft step reading a sparse view (513 positions shared by every layer, as
streaming; 1024 per layer, as topk), as ratios to the one-row forward."""
import argparse, statistics, time
import torch
import veridraft
from veridraft.drafters.draft_head import SubsetHead, draft_step
from veridraft.sampling import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--precision", default="bf16")
ap.add_argument("--context", type=int, default=7400)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeats", type=int, default=12)
a = ap.parse_args()
torch.set_num_threads(a.threads)
m = veridraft.load(a.model, precision=a.precision)
net, L = m.net, a.context
cache = net.new_cache(L + 64)
ids = torch.randint(100, 40000, (L,), generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
with torch.inference_mode():
    for s in range(0, L, 1024):
        net(ids[s : s + 1024], cache, num_logits=1)
print(f"prefill {L} positions: {time.perf_counter() - t0:.1f} s", flush=True)
head = SubsetHead(net, 16384)
head.observe(ids.tolist())
g = SamplingParams()
layers = range(net.config.n_layers)
v513 = torch.cat((torch.arange(16), torch.arange(L - 497, L)))
shared = {i: v513 for i in layers}
per_layer = {i: torch.randperm(L)[:1024].sort().values for i in layers}


def full(T):
    def f():
        net(torch.full((T,), 5), cache, num_logits=T)
        cache.truncate(L)
    return f


def drafts(view):
    def f():
        draft_step(net, [5], cache, head=head, sampling=g, sampled=False, generator=None, view=view)
        cache.truncate(L)
    return f


fns = {"target T=1": full(1), "target T=4": full(4), "target T=10": full(10),
       "draft, 513 shared": drafts(shared), "draft, 1024 per layer": drafts(per_layer)}
times = {k: [] for k in fns}
with torch.inference_mode():
    for f in fns.values():
        f()
    for r in range(a.repeats):
        for k, f in fns.items():  # interleaved: each round measures every kind once
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
cpu = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
print(f"{a.model} {a.precision}, context {L}, {a.threads} threads, {cpu}")
for k in fns:
    r = statistics.median(x / y for x, y in zip(times[k], times["target T=1"]))
    print(f"{k:24s} median {statistics.median(times[k]) * 1000:7.1f} ms   ratio to T=1 {r:.2f}")
