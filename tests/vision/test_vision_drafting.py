"""Lossless drafting over a video prompt: every drafter that drafts on the target's own cache
gives bitwise plain decoding's greedy ids on a tiny random Qwen2.5-VL, in fp32 and bf16, with
the video in a "video" segment (pruned by the selection rules) and the question kept."""

from __future__ import annotations

import pytest
import torch
from conftest import END, START, VIDEO, make_hf

from veridraft import models
from veridraft.decode import decode
from veridraft.drafters import make_drafter
from veridraft.sampling import SamplingParams
from veridraft.vision import processor as P
from veridraft.vision.chat import vision_prompt

NEW_TOKENS = 40
# The sparse views read 48 of the ~150 cached positions: the video is really pruned.
SPECS = [
    "ngram",
    "suffix",
    "streaming:budget=48",
    "snapkv:budget=48",
    "topk:budget=48",
    "pruned",
    "pruned:budget=48,refresh=2",
    "layerskip",
    "snapkv:budget=48,layerskip=true",
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2_5_vl_drafting")
    make_hf("qwen2_5_vl", 7).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def net(request, folder):
    return models.from_folder(folder, request.param)


@pytest.fixture(scope="module")
def video_prompt(sample_video):
    """System text, the real clip (4 temporal patches of 6x5 tokens), a question, the turn's
    end: ids, segments and the processed video."""
    video = P.process_video(str(sample_video), fps=2.0, min_pixels=4 * 784, max_pixels=30 * 784)
    system = [10, 11, 12, 13]
    question = [30, 31, 32, 33, 34, 35, 36, 37]
    ids = system + [START] + [VIDEO] * video.num_tokens + [END] + question + [40, 41]
    a = len(system) + 1
    q = a + video.num_tokens + 1
    segments = [
        ("system", 0, len(system)),
        ("video", a, a + video.num_tokens),
        ("question", q, q + len(question)),
    ]
    return ids, segments, [video]


def run(net, ids, segments, drafter=None):
    return decode(
        net,
        ids,
        max_new_tokens=NEW_TOKENS,
        sampling=SamplingParams(),
        generator=torch.Generator(),
        drafter=drafter,
        segments=segments,
    )


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:layerskip")
def test_lossless_drafters_give_plain_decoding_on_a_video_prompt(net, video_prompt):
    ids, segments, items = video_prompt
    vp = vision_prompt(net, ids, items)
    with net.use_prompt(vp):
        plain, _ = run(net, ids, segments)
        for spec in SPECS:
            out, stats = run(net, ids, segments, make_drafter(spec, net))
            assert out == plain, spec
            assert stats.drafted > 0, f"{spec} never drafted: the check would not test it"


def test_the_views_keep_the_question_and_prune_the_video(net, video_prompt):
    """What the selection rules read: the question and system segments whole, a few of the
    video's positions."""
    ids, segments, items = video_prompt
    vp = vision_prompt(net, ids, items)
    (_, va, vb), (_, qa, qb) = segments[1], segments[2]
    with net.use_prompt(vp):
        for spec in ("snapkv:budget=48", "topk:budget=48", "pruned"):
            drafter = make_drafter(spec, net)
            decode(  # the drafter selects at its prefill
                net,
                ids,
                max_new_tokens=2,
                sampling=SamplingParams(),
                generator=torch.Generator(),
                drafter=drafter,
                segments=segments,
            )
            views = list(drafter.sel.views.values())
            assert views, spec
            for view in views:
                kept = set(view.flatten().tolist())
                assert set(range(qa, qb)) <= kept and set(range(0, 4)) <= kept, spec
                video_kept = len(kept & set(range(va, vb)))
                assert 0 < video_kept < (vb - va) // 2, (spec, video_kept)
