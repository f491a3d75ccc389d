import time, torch, statistics
torch.set_num_threads(1)
import veridraft
from veridraft.drafters.draft_head import SubsetHead, draft_step
from veridraft.sampling import SamplingParams
m = veridraft.load("smollm2-135m"); net = m.net
L = 8000
cache = net.new_cache(L + 64)
ids = torch.randint(100, 40000, (L,))
t0 = time.perf_counter()
with torch.inference_mode():
    for s in range(0, L, 1024):
        net(ids[s:s+1024], cache, num_logits=1)
print("prefill", time.perf_counter() - t0, flush=True)
head = SubsetHead(net, 16384); head.observe(ids.tolist())
g = SamplingParams()
v513 = torch.cat((torch.arange(16), torch.arange(L - 497, L)))
shared = {i: v513 for i in range(30)}
per_layer = {i: torch.randperm(L)[:1024].sort().values for i in range(30)}
def full(T):
    def f(): net(torch.full((T,), 5), cache); cache.truncate(L)
    return f
def drafts(view):
    def f(): draft_step(net, [5], cache, head=head, sampling=g, sampled=False, generator=None, view=view); cache.truncate(L)
    return f
fns = {"T1": full(1), "T4": full(4), "T10": full(10), "draft_streaming513": drafts(shared), "draft_topk1024": drafts(per_layer)}
times = {k: [] for k in fns}
with torch.inference_mode():
    for f in fns.values(): f()
    for r in range(12):
        for k, f in fns.items():  # interleaved: each round measures every kind once
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
ratios = {k: statistics.median(a / b for a, b in zip(times[k], times["T1"])) for k in fns}
for k in fns:
    print(f"{k:22s} median {statistics.median(times[k])*1000:7.1f} ms   per-round ratio to T1 {ratios[k]:.2f}")
