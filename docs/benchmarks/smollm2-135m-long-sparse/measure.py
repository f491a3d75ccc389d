"""In-process long-context measurement: plain decoding vs sparse-cache drafters on one prefilled
prompt (prefilled once, in chunks; methods interleaved after a warm-up; decode tokens/s = new
tokens / (generation time - prefill time); exact = the same ids as plain decoding)."""
import argparse, json, os, time, statistics, platform
import torch
import veridraft
from veridraft.decode import Prefill
from veridraft.drafters import forget_earlier_generations
from veridraft.generate import generate_ids

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--precision", default="fp32")
ap.add_argument("--context", type=int, default=2048)
ap.add_argument("--new", type=int, default=128)
ap.add_argument("--prompts", type=int, default=2)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--methods", default="streaming,snapkv")
ap.add_argument("--books", default="emma,prideprejudice,mansfieldpark,sensesensibility")
ap.add_argument("--out", default=None)
ap.add_argument("--data", required=True, help="austen.jsonl (the long-document data)")
a = ap.parse_args()
torch.set_num_threads(a.threads)
m = veridraft.load(a.model, precision=a.precision)
tok = m.tokenizer
books = {json.loads(l)["key"]: json.loads(l) for l in open(a.data)}
methods = ["ar"] + [s for s in a.methods.split("|") if s]

def prompt_for(key):
    b = books[key]
    text = "\n\n".join(c["title"] + "\n\n" + c["text"] for c in b["chapters"][:40])
    ids = tok.encode(text)[: a.context]
    return ids

@torch.inference_mode()
def chunked_prefill(ids, max_len):
    net = m.net
    cache = net.new_cache(max_len)
    for s in range(0, len(ids), 512):
        logits = net(torch.tensor(ids[s:s+512]), cache, num_logits=1)
    return Prefill(ids=list(ids), cache=cache, logits=logits[-1].clone())

rows = {mm: [] for mm in methods}
for pi, key in enumerate(a.books.split(",")[: a.prompts]):
    ids = prompt_for(key)
    t = time.perf_counter()
    pf = chunked_prefill(ids, len(ids) + a.new + 64)
    print(f"prompt {key}: {len(ids)} tokens, prefill {time.perf_counter()-t:.1f}s", flush=True)
    if pi == 0:  # warm-up: every method once, short
        for mm in methods:
            generate_ids(m, ids, max_new_tokens=8, draft=None if mm == "ar" else mm, prefilled=pf, warn=False)
        forget_earlier_generations()  # no measured run drafts from a warm-up's answer
    ref = None
    for mm in methods:
        new, st = generate_ids(m, ids, max_new_tokens=a.new, draft=None if mm == "ar" else mm, prefilled=pf, warn=False)
        dec = st.total_s - st.prefill_s
        if mm == "ar":
            ref = new
        r = dict(tps=len(new) / dec, tau=st.tau, alpha=st.alpha, exact=new == ref, n=len(new), draft_s=st.draft_s, verify_s=st.verify_s)
        rows[mm].append(r)
        print(f"  {mm:45s} {r['tps']:6.2f} tok/s  tau {st.tau:.2f}  alpha {st.alpha if st.alpha is None else round(st.alpha,2)}  exact {r['exact']}  draft {st.draft_s:.1f}s verify {st.verify_s:.1f}s", flush=True)
    del pf
cpu = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
print(f"\n{a.model} {a.precision}, context {a.context}, {a.new} new tokens, {a.prompts} prompts, {a.threads} thread(s), {cpu}")
print(f"{'method':45s} {'tok/s':>7s} {'speedup':>8s} {'tau':>5s} {'exact':>6s}")
ar = statistics.mean(r["tps"] for r in rows["ar"])
summary = []
for mm in methods:
    tps = statistics.mean(r["tps"] for r in rows[mm])
    sp = statistics.mean(r["tps"] / a0["tps"] for r, a0 in zip(rows[mm], rows["ar"]))
    tau = statistics.mean(r["tau"] for r in rows[mm])
    ex = sum(r["exact"] for r in rows[mm])
    print(f"{mm:45s} {tps:7.2f} {sp:7.2f}x {tau:5.2f} {ex}/{len(rows[mm])}")
    summary.append(dict(method=mm, tok_s=tps, speedup=sp, tau=tau, exact=ex, n=len(rows[mm])))
if a.out:
    # file names only: a result is committed and shared, the machine's paths mean nothing there
    args = {**vars(a), "data": os.path.basename(a.data), "out": os.path.basename(a.out)}
    json.dump(dict(args=args, cpu=cpu, summary=summary, rows=rows), open(a.out, "w"), indent=1)
