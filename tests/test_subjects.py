"""Subjects land on the right tokens."""

import pytest
from transformers import CLIPTokenizer

from moa.data.subjects import SubjectBindingError, token_positions, word_ends


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return CLIPTokenizer.from_pretrained(tiny_dir / "stable-diffusion", subfolder="tokenizer")


def _bind(tokenizer, prompt, words):
    encoded = tokenizer(prompt, max_length=77, padding="max_length", truncation=True, return_offsets_mapping=True)
    positions = token_positions(encoded["offset_mapping"], word_ends(prompt, words), prompt)
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    return positions, tokens


def test_multiple_subjects_and_repeated_words(tokenizer):
    positions, tokens = _bind(tokenizer, "a man and a woman and a man", ["man", "woman", "man"])
    assert [tokens[p] for p in positions] == ["man</w>", "woman</w>", "man</w>"]
    assert positions[0] < positions[1] < positions[2]


def test_word_split_into_several_tokens_binds_its_last_token(tokenizer):
    prompt = "a firefighterish person"
    positions, tokens = _bind(tokenizer, prompt, ["firefighterish"])
    assert tokens[positions[0]].endswith("</w>")
    pieces = tokens[1: positions[0] + 1]
    assert len(pieces) > 2, "the test needs a word split into several tokens"
    assert "".join(pieces).replace("</w>", "") == "afirefighterish"


def test_word_is_case_insensitive_and_respects_word_boundaries(tokenizer):
    positions, tokens = _bind(tokenizer, "A Woman beside a woman's dog", ["woman"])
    assert tokens[positions[0]] == "woman</w>"
    with pytest.raises(SubjectBindingError, match="occurs 0 time"):
        word_ends("a human", ["man"])


def test_missing_word_and_too_many_subjects_are_clear_errors():
    with pytest.raises(SubjectBindingError, match="'woman'.*occurs 0 time"):
        word_ends("a man on a horse", ["woman"])
    with pytest.raises(SubjectBindingError, match="2 subject"):
        word_ends("a man on a horse", ["man", "man"])
    with pytest.raises(SubjectBindingError, match="at most 4"):
        word_ends("a a a a a", ["a"] * 5)


def test_word_beyond_the_tokenizer_length_is_reported_not_misbound(tokenizer):
    prompt = "a dog " * 60 + "and a man"
    positions, _ = _bind(tokenizer, prompt, ["man"])
    assert positions == [None]
