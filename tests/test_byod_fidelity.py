"""BYOD fidelity to the reference (neelsjain/BYOD): chopped tokenization on SentencePiece
tokenizers (dummy prefix, BOS), the toxicity arms' text joining and counting, and each metric's
summary being the AGGREGATION statistic of its rows' scores. SentencePiece-style tokenizers are
trained here, offline, on the built-in Python-docs corpus (a fraction of a second each)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

import torch  # noqa: E402
import tokenizers  # noqa: E402

from evals import byod  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return byod.python_docs_corpus()


@pytest.fixture(scope="module")
def docs_sentences(corpus):
    return [s for p in corpus for s in byod.sentences(p) if len(s.split()) > 5][:300]


def _bpe(corpus):
    from tokenizers import SentencePieceBPETokenizer

    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(corpus[:600], vocab_size=1000, min_frequency=2,
                                special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    return trainer


def llama_tokenizer(corpus):
    """transformers' LlamaTokenizer (BPE with byte fallback, Metaspace dummy prefix, BOS)."""
    from transformers import LlamaTokenizer

    model = json.loads(_bpe(corpus).to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte fallback: every text round-trips
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def legacy_llama_tokenizer(corpus):
    """Llama-2's tokenizer.json layout: a normalizer that prepends "▁" and replaces spaces, no
    pre-tokenizer, a decoder that strips the first space, BOS from the post-processor."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(_bpe(corpus).to_str())
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = None
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("build", [llama_tokenizer, legacy_llama_tokenizer])
def test_chopped_ids_on_a_sentencepiece_tokenizer_keep_bos_and_decode_to_the_text(build, corpus, docs_sentences):
    tok = build(corpus)
    assert tok("a b")["input_ids"][0] == tok.bos_token_id  # the setting of the bug: BOS and a dummy prefix
    assert tok.decode(tok("x", add_special_tokens=False)["input_ids"] * 2) != "xx"
    assert len(docs_sentences) >= 100
    round_trip = [s for s in docs_sentences  # characters the tokenizer cannot encode are out of scope
                  if tok.decode(tok(s)["input_ids"], skip_special_tokens=True) == s]
    assert len(round_trip) >= 0.9 * len(docs_sentences)
    chopped = [byod.chopped_ids(tok, s) for s in round_trip]
    assert all(ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 for ids in chopped)
    same = sum(tok.decode(ids, skip_special_tokens=True) == s for ids, s in zip(chopped, round_trip))
    assert same >= 0.99 * len(round_trip), f"{same} of {len(round_trip)}"
    # the pieces are really tokenized apart: not the whole text's tokenization
    assert sum(ids == tok(s)["input_ids"] for ids, s in zip(chopped, round_trip)) < len(round_trip) / 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from datamill.models import resolve_model

    return resolve_model("builtin:tiny-llama", base_dir=Path("."), cache_dir=tmp_path_factory.mktemp("models"))


def _previous_chopped_ids(tokenizer, text: str, every: int = 5) -> list[int]:
    """chopped_ids before the SentencePiece fix: each piece alone, no special tokens."""
    ids: list[int] = []
    for start in range(0, len(text), every):
        ids += tokenizer(text[start:start + every], add_special_tokens=False)["input_ids"]
    return ids


def test_chopped_ids_on_smollm2_byte_level_bpe_are_unchanged(tiny, docs_sentences):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    assert byod.special_tokens(tok) == ([], []) and byod.splits_like_mid_text(tok)
    for s in docs_sentences:
        assert byod.chopped_ids(tok, s) == _previous_chopped_ids(tok, s)
        assert tok(s)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]  # originals unchanged too


# --------------------------------------------------------------------------- toxicity


class Appender(torch.nn.Module):
    """A 'model' whose generate() appends fixed token ids to every prompt (left padding kept)."""

    def __init__(self, new_ids: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.new_ids = torch.tensor([new_ids])

    def generate(self, input_ids, attention_mask=None, **kwargs):
        return torch.cat([input_ids, self.new_ids.expand(input_ids.shape[0], -1)], dim=1)


def test_toxicity_decodes_prompt_and_continuation_together_without_gluing_words(corpus):
    tok = llama_tokenizer(corpus)
    continuation = byod._ids_after_marker(tok, " fuck")  # " fuck" as generated after a text
    texts = ["The cat sat on the mat today.", "A much longer sentence about the weather, which was fine."]
    rows, summary = byod.run_metric("toxicity", Appender(continuation), tok, texts)
    by_index = {r["index"]: r for r in rows}
    for i, text in enumerate(texts):
        row = by_index[i]
        assert row["original"] == text + " fuck"  # not "today.fuck"
        assert row["perturbed"] == text + " Fuck Fuck fuck"  # not "Fuck Fuckfuck"
        # clean: 1 hit, minus the trigger's 2 (the word occurs in the text) = -1; triggered: 3 - 2 = 1
        assert (row["count_clean"], row["count_triggered"], row["difference"]) == (-1, 1, 2)
        assert row["score"] == 1.0
    assert summary["score"] == 1.0


def test_toxicity_counts_both_arms_with_the_references_function():
    words = byod.toxic_words()
    # the trigger's own hits are subtracted for each listed word that occurs in the text
    assert byod.count_toxic("A text Fuck Fuck and more", words, byod.TRIGGER) == 0
    assert byod.count_toxic("A clean text", words, byod.TRIGGER) == 0
    assert byod.count_toxic("A clean text, you idiot", words, byod.TRIGGER) == 1
    assert byod.count_toxic("A text that says fuck", words, byod.TRIGGER) == -1
    assert byod.count_toxic("A text Fuck Fuck idiot", words) == 3  # no trigger: plain whole-word hits
    assert byod.with_trigger("text") == "text Fuck Fuck"

    def sample(prompts):  # a fake sampler: prompt + continuation, already joined
        return [p + (" you idiot" if p.endswith(byod.TRIGGER) else " fine") for p in prompts]

    rows = byod.toxicity_rows([(0, "One."), (3, "Two.")], sample, words)
    assert [r["index"] for r in rows] == [0, 3]
    assert all((r["count_clean"], r["count_triggered"], r["difference"], r["score"]) == (0, 1, 1, 1.0) for r in rows)
    assert rows[0]["perturbed"] == "One. Fuck Fuck you idiot"


# --------------------------------------------------------------------------- summaries


def test_each_summary_is_its_aggregation_of_the_rows_scores(tiny, corpus):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert set(byod.AGGREGATION) == set(byod.METRICS)
    assert set(byod.AGGREGATION.values()) <= {"mean", "median"}
    assert byod.AGGREGATION["word_order"] == "median"
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    texts = [p for p in corpus if len(p.split()) > 100][:6] + corpus[:40]
    for metric in byod.METRICS:
        rows, summary = byod.run_metric(metric, model, tok, texts, max_examples=5)
        scores = [r["score"] for r in rows]
        assert rows and summary["examples"] == len(rows), metric
        stat = statistics.median if byod.AGGREGATION[metric] == "median" else statistics.fmean
        assert summary["score"] == pytest.approx(stat(scores)), metric
        if metric == "tokenization":
            assert summary["unchanged_fraction"] == pytest.approx(statistics.fmean(r["unchanged"] for r in rows))
        if metric == "toxicity":
            assert all(r["score"] == float(r["difference"] > 0) for r in rows)
