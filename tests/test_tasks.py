"""Haystack generator, exact-length retrieval prompts and their scoring."""
from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpe_export.evaluation.haystack import (  # noqa: E402
    generate_haystack,
    haystack_sentences,
    load_haystack,
    split_sentences,
)
from dpe_export.evaluation.tasks import (  # noqa: E402
    NIAH_KEYS,
    PromptBuilder,
    build_niah_prompts,
    build_passkey_prompt,
    extract_number,
    score_answer,
    score_niah,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ----------------------------------------------------------------------------------------------------------
# Tokenizers: a byte-level BPE (GPT-2 / Llama-3 / Qwen style), a Metaspace BPE (SentencePiece style) and a
# word-level one whose vocabulary misses almost every word; plus the trained testbed tokenizers if present.
# ----------------------------------------------------------------------------------------------------------


def _train_bpe(kind: str):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from dpe_export.evaluation.tasks import NIAH_INTRO, PASSKEY_INTRO

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, initial_alphabet=alphabet)
    phrases = [PASSKEY_INTRO, NIAH_INTRO, "The pass key is 1. Remember it. What is the pass key?",
               "One of the special magic numbers for x is: 1. What is the special magic number for x?"]
    texts = [generate_haystack(5000, seed=11), "0123456789 :-?"] + phrases * 20 + NIAH_KEYS * 3
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _wordlevel():
    from helpers import tiny_tokenizer

    return tiny_tokenizer()


def _testbed_dirs():
    return sorted(p for p in FIXTURES.glob("testbed-*") if (p / "tokenizer.json").exists())


_TOKENIZER_KINDS = ["bytelevel", "metaspace", "wordlevel"] + [p.name for p in _testbed_dirs()]
_tok_cache: dict = {}


@pytest.fixture(params=_TOKENIZER_KINDS)
def tokenizer(request):
    kind = request.param
    if kind not in _tok_cache:
        if kind == "wordlevel":
            _tok_cache[kind] = _wordlevel()
        elif kind.startswith("testbed-"):
            from transformers import AutoTokenizer

            _tok_cache[kind] = AutoTokenizer.from_pretrained(FIXTURES / kind)
        else:
            _tok_cache[kind] = _train_bpe(kind)
    return _tok_cache[kind]


@pytest.fixture(scope="module")
def bpe():
    if "bytelevel" not in _tok_cache:
        _tok_cache["bytelevel"] = _train_bpe("bytelevel")
    return _tok_cache["bytelevel"]


# ----------------------------------------------------------------------------------------------------------
# Haystack
# ----------------------------------------------------------------------------------------------------------


def test_haystack_is_deterministic_and_seeded():
    a = generate_haystack(500, seed=3)
    assert a == generate_haystack(500, seed=3)
    assert a != generate_haystack(500, seed=4)
    assert len(a.split()) >= 500
    assert len(generate_haystack(num_chars=2000, seed=1)) >= 2000
    assert not re.search(r"\d", generate_haystack(5000, seed=0))


def test_haystack_is_varied():
    sents = split_sentences(generate_haystack(5000, seed=0))
    assert len(set(sents)) > 0.9 * len(sents)
    lengths = [len(s.split()) for s in sents]
    assert min(lengths) <= 6 and max(lengths) >= 20
    assert len({s.split()[0] for s in sents}) > 30  # many different sentence openings
    with pytest.raises(ValueError):
        generate_haystack(10, num_chars=10)


def test_load_haystack_repeats_short_file_with_warning(tmp_path):
    f = tmp_path / "hay.txt"
    f.write_text("The cat sat on the mat. It was a sunny day!\n\nBirds sang.", encoding="utf-8")
    with pytest.warns(UserWarning, match="repeating"):
        text = load_haystack(f, num_chars=500)
    assert len(text) >= 500 and text.count("Birds sang.") > 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_haystack(f, num_chars=10).startswith("The cat")
    assert split_sentences("The cat sat. It was day! Birds?  Yes") == ["The cat sat.", "It was day!", "Birds?", "Yes"]
    stream = haystack_sentences(f, seed=0)
    with pytest.warns(UserWarning, match="too short"):
        first = [next(stream) for _ in range(10)]
    assert set(first) == {"The cat sat on the mat.", "It was a sunny day!", "Birds sang."}


# ----------------------------------------------------------------------------------------------------------
# Exact lengths
# ----------------------------------------------------------------------------------------------------------


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("length", [160, 256, 257, 512, 1000, 2048])
def test_passkey_prompt_has_exact_length(tokenizer, length):
    b = PromptBuilder(tokenizer)
    for depth in (0.0, 0.37, 1.0):
        p = b.passkey(length, depth=depth, seed=length)
        assert len(p.input_ids) == length
        assert re.fullmatch(r"[1-9]\d{4}", p.answer)
        assert all(isinstance(i, int) for i in p.input_ids)
        needle = b.encode_piece(f"The pass key is {p.answer}. Remember it. {p.answer} is the pass key.")
        pos = p.needle_positions[0]
        assert p.input_ids[pos:pos + len(needle)] == needle


@pytest.mark.parametrize("length", [200, 256, 511, 1024, 3000])
def test_niah_prompts_have_exact_length(tokenizer, length):
    qs = PromptBuilder(tokenizer).niah_queries(length, num_needles=4, seed=length)
    assert len(qs) == 4
    assert len({q.answer for q in qs}) == 4
    for q in qs:
        assert len(q.input_ids) == length
        assert re.fullmatch(r"[1-9]\d{5}", q.answer)
        assert q.needle_positions == sorted(q.needle_positions)
        assert q.meta["key"] in NIAH_KEYS
    # All queries share the needles and their positions.
    assert len({tuple(q.needle_positions) for q in qs}) == 1


def test_passkey_depth_places_needle(bpe):
    b = PromptBuilder(bpe)
    length = 1200
    pos = [b.passkey(length, depth=d, seed=1).needle_positions[0] for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert pos == sorted(pos) and len(set(pos)) == 5
    intro = len(b.prefix_ids) + len(b.encode_piece(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.", leading_space=False))
    assert pos[0] == intro
    needle_len = len(b.encode_piece("The pass key is 12345. Remember it. 12345 is the pass key."))
    query_len = len(b.encode_piece("What is the pass key? The pass key is"))
    assert pos[-1] + needle_len + query_len == length
    for d, p in zip((0.25, 0.5, 0.75), pos[1:4]):  # within a sentence of the requested depth
        assert abs(p / length - d) < 0.06


def test_prompts_are_deterministic_and_seeded(bpe):
    b1, b2 = PromptBuilder(bpe), PromptBuilder(bpe)
    assert b1.passkey(700, 0.5, seed=4).input_ids == b2.passkey(700, 0.5, seed=4).input_ids
    assert b1.passkey(700, 0.5, seed=4).input_ids != b1.passkey(700, 0.5, seed=5).input_ids
    assert [q.input_ids for q in b1.niah_queries(700, seed=2)] == [q.input_ids for q in b2.niah_queries(700, seed=2)]
    assert build_passkey_prompt(bpe, 300, seed=1).input_ids == b1.passkey(300, 0.5, seed=1).input_ids
    assert build_niah_prompts(bpe, 300, seed=1)[2].input_ids == b1.niah(300, seed=1, query_index=2).input_ids


def test_prompt_starts_with_bos_and_reads_naturally(bpe):
    b = PromptBuilder(bpe)
    p = b.passkey(400, depth=0.5, seed=7)
    assert p.input_ids[0] == bpe.bos_token_id and p.input_ids.count(bpe.bos_token_id) == 1
    text = bpe.decode(p.input_ids, skip_special_tokens=True)
    assert text.startswith("There is an important info hidden")
    assert f" The pass key is {p.answer}. Remember it. {p.answer} is the pass key. " in text
    assert text.endswith(" What is the pass key? The pass key is")
    assert "  " not in text
    assert bpe.decode(p.answer_ids) == " " + p.answer
    assert PromptBuilder(bpe, add_bos=False).passkey(400, seed=7).input_ids[0] != bpe.bos_token_id


def test_user_haystack_file(bpe, tmp_path):
    f = tmp_path / "hay.txt"
    f.write_text("Alpha beta gamma. Delta epsilon zeta eta. Theta iota kappa lambda mu.", encoding="utf-8")
    b = PromptBuilder(bpe, haystack_path=f)
    with pytest.warns(UserWarning, match="too short"):
        p = b.passkey(600, depth=0.5, seed=0)
    assert len(p.input_ids) == 600
    assert "Delta epsilon zeta eta." in bpe.decode(p.input_ids)


def test_too_short_length_raises(bpe):
    with pytest.raises(ValueError, match="too short"):
        PromptBuilder(bpe).passkey(20)
    with pytest.raises(ValueError):
        PromptBuilder(bpe).passkey(300, depth=1.5)


# ----------------------------------------------------------------------------------------------------------
# Scoring with scripted "models"
# ----------------------------------------------------------------------------------------------------------


def _echo_model(tokenizer):
    """Reads the prompt and answers with the needle the question asks for, like a perfect model."""

    def generate(input_ids):
        text = tokenizer.decode(input_ids, skip_special_tokens=True)
        m = re.search(r"for (\S+)\? The special magic number for \1 is:$", text)
        if m:
            key = m.group(1)
            return " " + re.search(re.escape(f"magic numbers for {key} is: ") + r"(\d+)", text).group(1) + ". The"
        return " " + re.search(r"The pass key is (\d+)\.", text).group(1) + ". Remember"

    return generate


def _wrong_model(tokenizer):
    echo = _echo_model(tokenizer)

    def generate(input_ids):
        ans = extract_number(echo(input_ids))
        return " " + str(int(ans) + 1)

    return generate


def test_echo_model_scores_100_and_wrong_model_scores_0(bpe):
    b = PromptBuilder(bpe)
    for make, expected in ((_echo_model, 1.0), (_wrong_model, 0.0)):
        model = make(bpe)
        for length in (256, 512, 1024):
            pk = [b.passkey(length, depth=d, seed=s) for s, d in enumerate((0.0, 0.3, 0.6, 1.0))]
            assert sum(score_answer(model(p.input_ids), p.answer) for p in pk) / len(pk) == expected
            qs = b.niah_queries(length, num_needles=4, seed=length)
            assert score_niah([model(q.input_ids) for q in qs], [q.answer for q in qs]) == expected


def test_scorer():
    assert score_answer(" 71432. Remember it.", "71432")
    assert score_answer("71432", "71432")
    assert score_answer(" 7 1 4 3 2 .", "71432")  # single-digit tokens decoded with spaces
    assert not score_answer(" 7143", "71432")
    assert not score_answer(" 714321", "71432")
    assert not score_answer(" the pass key", "71432")
    assert not score_answer(" 12345 71432", "71432")
    assert extract_number("abc") is None
    assert score_niah([" 123456", " 1", "x", " 654321"], ["123456", "1", "2", "654321"]) == 0.75
    assert score_niah([], []) == 0.0


# ----------------------------------------------------------------------------------------------------------
# Trained testbed checkpoints (tests/fixtures/testbed-*, made by scripts/train_testbed.py)
# ----------------------------------------------------------------------------------------------------------


def _greedy(model, ids, n):
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            x = torch.cat([x, model(input_ids=x).logits[:, -1:].argmax(-1)], 1)
    return x[0, len(ids):].tolist()


@pytest.mark.parametrize("path", _testbed_dirs(), ids=lambda p: p.name)
def test_testbed_checkpoint_retrieves_at_training_length_only(path):
    """A committed testbed retrieves pass keys and needles at its training length L and fails at 4L (plain
    RoPE; at 2L some testbeds still find part of them)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 10 * 1024 * 1024
    assert (path / "model.safetensors").exists() and (path / "README.md").exists()
    log = json.loads((path / "train_log.json").read_text())
    L = log["args"]["train_len"]
    assert log["accuracy"][str(L)]["passkey"] >= 0.95 and log["accuracy"][str(L)]["niah"] >= 0.95
    assert log["accuracy"][str(4 * L)]["passkey"] <= 0.3 and log["accuracy"][str(4 * L)]["niah"] <= 0.3
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.convert_ids_to_tokens(tok("pass key 71432", add_special_tokens=False)["input_ids"])[-5:] == list("71432")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert model.config.max_position_embeddings == L
    assert getattr(model.config, "sliding_window", None) is None
    b = PromptBuilder(tok, haystack_seed=1)

    def accuracy(prompts):
        gens = [tok.decode(_greedy(model, p.input_ids, len(p.answer_ids) + 1)) for p in prompts]
        return sum(score_answer(g, p.answer) for g, p in zip(gens, prompts)) / len(prompts)

    depths = (0.1, 0.5, 0.9)
    assert accuracy([b.passkey(L, depth=d, seed=10_000 + i) for i, d in enumerate(depths)]) >= 2 / 3
    assert accuracy([b.passkey(4 * L, depth=d, seed=20_000 + i) for i, d in enumerate(depths)]) <= 1 / 3
