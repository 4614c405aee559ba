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


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """OpenAI CLIP's real tokenizer, built offline from the BPE vocabulary the open-clip-torch wheel ships."""
    from pathlib import Path

    import open_clip

    from moa.pretrained import clip_tokenizer_files

    files = clip_tokenizer_files(Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz",
                                 tmp_path_factory.mktemp("clip-tokenizer"))
    return CLIPTokenizer(str(files / "vocab.json"), str(files / "merges.txt"))


def test_the_real_clip_tokenizer_matches_open_clip_and_binds_subjects_in_real_captions(clip_tokenizer):
    from open_clip.tokenizer import SimpleTokenizer

    assert clip_tokenizer("a man").input_ids == [49406, 320, 786, 49407]
    reference = SimpleTokenizer()
    captions = [  # FFHQ-wild-style BLIP-2 captions, and the protocol's kind of prompt
        "a woman in a red dress and a man in a suit standing on a beach",
        "a man wearing sunglasses holding a skateboard, café in Zürich",
        "a photo of a firefighter and a woman playing chess",
    ]
    for caption in captions:
        assert clip_tokenizer(caption).input_ids[1:-1] == reference.encode(caption), caption
    positions, tokens = _bind(clip_tokenizer, captions[0], ["woman", "man"])
    assert [tokens[p] for p in positions] == ["woman</w>", "man</w>"]
    positions, tokens = _bind(clip_tokenizer, captions[2], ["firefighter", "woman"])
    assert [tokens[p] for p in positions] == ["firefighter</w>", "woman</w>"]
