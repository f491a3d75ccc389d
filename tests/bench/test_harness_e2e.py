"""A short end-to-end benchmark on a tiny random Llama with a tiny trained tokenizer:
veridraft `ar` and `ngram` against transformers `hf:ar`, all three output files, and compare."""

import argparse
import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from veridraft.bench.cli import add_bench_parser, run_bench_cli
from veridraft.bench.report import compare_files
from veridraft.bench.run import BenchConfig, run_bench
from veridraft.errors import VeridraftError

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QUESTIONS = [
    {
        "question_id": 81,
        "category": "writing",
        "turns": ["Write a short note about the sea.", "Now make it shorter."],
    },
    {
        "question_id": 241,
        "category": "summarization",
        "turns": ["Summarize: the cat sat on the mat. The cat sat on the mat again."],
    },
    {"question_id": 321, "category": "qa", "turns": ["Who wrote the note about the sea?"]},
]


def make_tiny(folder, vocab_size=320, seed=0):
    """A tiny random Llama with a small byte-level BPE tokenizer and a chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = [t for q in QUESTIONS for t in q["turns"]] * 20 + [
        "the quick brown fox jumps over the lazy dog",
        "summarize write note sea cat mat",
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<|im_start|>",
                "eos_token": "<|im_end|>",
                "unk_token": "<|endoftext|>",
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    (folder / "chat_template.jinja").write_text(CHAT)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).float().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("tiny-llama"))
    qfile = folder / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return folder


def test_short_run_writes_all_three_files(tiny_folder, tmp_path):
    out = tmp_path / "bench"
    msgs = []
    cfg = BenchConfig(
        "ar,ngram,hf:ar,llamacpp:ar",
        tiny_folder / "questions.jsonl",
        max_new_tokens=24,
        warmup=1,
        out=out,
        threads=1,
        progress=False,
        command="veridraft bench (test)",
    )
    res = run_bench(str(tiny_folder), cfg, log=msgs.append)
    assert {p.name for p in out.iterdir()} >= {"results.json", "report.md", "speedup.png"}
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "records.partial.jsonl").exists()  # removed once results.json is written
    data = json.loads((out / "results.json").read_text())
    recs = data["records"]
    # 4 generations per method (MT-Bench question: 2 turns); llama.cpp is skipped, not run
    assert len(recs) == 3 * 4 and not any(r.get("error") for r in recs)
    assert data["methods"]["llamacpp:ar"]["skipped"]
    assert any("skipping method llamacpp:ar" in m for m in msgs)
    for r in recs:
        assert r["new_tokens"] == len(r["ids"]) > 0 and r["wall_s"] > 0
        assert r["group"] in ("mt_bench", "summarization", "qa")
    assert {r["turn"] for r in recs if r["question_id"] == 81} == {0, 1}
    env = data["environment"]
    for k in ("torch", "transformers", "veridraft", "threads", "cpu", "date", "command"):
        assert env[k] is not None
    t = data["summary"]["table"]["overall"]
    assert t["ar"]["tau"] == 1.0 and t["ar"]["speedup"] == 1.0
    assert t["ngram"]["exact_match"] == 1.0, "ngram is lossless: same ids as ar"
    assert t["ngram"]["tau"] >= 1.0 and t["hf:ar"]["speedup"] == 1.0
    assert t["hf:ar"]["exact_compared"] == 3 and t["hf:ar"]["vs_ar"] > 0
    assert data["summary"]["groups"] == ["mt_bench", "summarization", "qa", "overall"]
    assert data["bandwidth_bound"]["bound_tokens_per_s"] > 0
    report = (out / "report.md").read_text()
    for s in (
        "veridraft bench (test)",
        "## Overall",
        "### mt_bench",
        "How to read",
        "Memory-bandwidth bound",
        "skipped",
        "`hf:ar`",
        "## Environment",
    ):
        assert s in report
    assert res["files"]["report"] == str(out / "report.md")
    assert json.loads((out / "results.json").read_text())["files"]["report"] == "report.md"
    text = compare_files(out / "results.json", out)
    assert "[overall]" in text and "ngram" in text and "(+0%)" in text


def test_cli_parser_and_compare(tiny_folder, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="veridraft")
    add_bench_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(
        [
            "bench",
            "--model",
            str(tiny_folder),
            "--methods",
            "ar,ngram:num_tokens=4,max_ngram=2",
            "--questions",
            str(tiny_folder / "questions.jsonl"),
            "--limit",
            "1",
            "--groups",
            "qa,summarization",
            "--max-new-tokens",
            "8",
            "--warmup",
            "0",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert args.methods == "ar,ngram:num_tokens=4,max_ngram=2" and args.threads == 1
    assert run_bench_cli(args) == 0
    out = capsys.readouterr().out
    assert "ngram:num_tokens=4,max_ngram=2" in out and "report:" in out
    recs = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    assert sorted({r["question_id"] for r in recs}) == [241, 321]
    args = parser.parse_args(
        [
            "bench",
            "compare",
            str(tmp_path / "run" / "results.json"),
            str(tmp_path / "run"),
            "--group",
            "qa",
        ]
    )
    assert run_bench_cli(args) == 0
    assert "[qa]" in capsys.readouterr().out
    args = parser.parse_args(
        ["bench", "report", str(tmp_path / "run"), "--out", str(tmp_path / "again")]
    )
    assert run_bench_cli(args) == 0
    assert (tmp_path / "again" / "report.md").read_text().startswith("# veridraft bench")
    assert (tmp_path / "again" / "speedup.png").is_file()


def test_bad_questions_file_is_a_clear_error(tiny_folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "category": "qa", "turns": ["x"]}\n{"question": 2}\n')
    with pytest.raises(VeridraftError, match=r"bad.jsonl, line 2: missing field"):
        run_bench(str(tiny_folder), BenchConfig("ar", bad, progress=False), log=lambda s: None)


@pytest.mark.parametrize("other_tokenizer", [False, True])
def test_hf_assisted_peer(tiny_folder, tmp_path, other_tokenizer):
    """hf:assisted:DRAFT runs transformers assisted generation, in universal (different
    tokenizer) mode when the draft's vocabulary differs; greedy output equals hf:ar's."""
    import veridraft
    from veridraft.bench.peers import make_peer

    draft = make_tiny(tmp_path / "draft", vocab_size=300 if other_tokenizer else 320, seed=1)
    model = veridraft.load(str(tiny_folder), precision="fp32")
    ar, assisted = make_peer("hf:ar", model), make_peer(f"hf:assisted:{draft}", model)
    ar.prepare()
    assisted.prepare()
    assert assisted.universal is other_tokenizer and assisted.baseline == "hf:ar"
    ids = model.tokenizer.encode("Write a short note about the sea.")
    a = ar.run(ids, max_new_tokens=12, temperature=0.0, seed=0)
    b = assisted.run(ids, max_new_tokens=12, temperature=0.0, seed=0)
    assert b.ids == a.ids and b.steps >= 1 and b.stats is None
    with pytest.raises(VeridraftError, match="hf:ar, hf:pld or hf:assisted"):
        make_peer("hf:nope", model)
