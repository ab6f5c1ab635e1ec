"""The offline SD 1.x CLIP tokenizer and the token bookkeeping in templates.py."""
from __future__ import annotations

import pytest

from personalize.errors import BadInputError
from personalize.templates import (NEUTRAL_TEMPLATES, PHRASE_MAX, check_new_token, fill, phrase_ids,
                                  phrase_last_position, word_position)
from personalize.tokenizer import MAX_LENGTH, SD_VOCAB_SIZE, build_clip_tokenizer, token_pieces

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return build_clip_tokenizer()


# --------------------------------------------------------------------------- the SD 1.x ids
def test_known_sd_ids(tok):
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tok("sks").input_ids == [49406, 48136, 49407]


def test_size_and_special_tokens(tok):
    assert len(tok) == SD_VOCAB_SIZE == 49408
    assert tok.model_max_length == MAX_LENGTH == 77
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS
    assert tok.convert_ids_to_tokens([BOS, EOS]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tok.pad_token_id == EOS  # SD 1.x pads with <|endoftext|>


def test_padding_to_77_with_endoftext(tok):
    ids = tok("a photo of a dog", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[:7] == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert ids[7:] == [49407] * 70
    batch = tok(["a dog", "a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt")
    assert tuple(batch.input_ids.shape) == (2, 77)
    assert batch.input_ids[0, :4].tolist() == [BOS, 320, 1929, EOS]
    assert (batch.input_ids[0, 4:] == EOS).all()


def test_truncation_keeps_77_and_ends_with_eos(tok):
    ids = tok(" ".join(["dog"] * 100), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == BOS and ids[-1] == EOS
    assert ids[1:-1] == [1929] * 75


@pytest.mark.parametrize(
    "text",
    [
        "a photo of a dog",
        "A Photo of the cool teddy-bear, on the beach!",
        "<my-teddy> sitting on a teapot",
        "Hello   World 123 café",
        "a sks dog in the snow, 4k, trending on artstation",
        "teddybear",
    ],
)
def test_matches_reference_clip_bpe(tok, text):
    """Identical ids to open_clip's own implementation of OpenAI CLIP's tokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = [BOS] + SimpleTokenizer().encode(text) + [EOS]
    assert tok(text).input_ids == reference


def test_lowercases_like_clip(tok):
    assert tok("A PHOTO OF A DOG").input_ids == tok("a photo of a dog").input_ids


def test_each_call_gives_a_fresh_tokenizer(tok):
    a, b = build_clip_tokenizer(), build_clip_tokenizer()
    assert a is not b
    a.add_tokens(["<zzz-new>"])
    assert len(a) == SD_VOCAB_SIZE + 1
    assert len(b) == SD_VOCAB_SIZE  # adding to one does not leak into another (or the cache)
    assert len(build_clip_tokenizer()) == SD_VOCAB_SIZE


def test_token_pieces(tok):
    assert token_pieces(tok, "teddybear") == ["teddy", "bear</w>"]
    assert token_pieces(tok, "dog") == ["dog</w>"]


# --------------------------------------------------------------------------- templates
def test_word_position_for_a_photo_of_a(tok):
    assert word_position(tok, "a photo of a {}", "dog") == 5
    ids = tok(fill("a photo of a {}", "dog")).input_ids
    assert ids[5] == phrase_ids(tok, "dog")[0] == 1929


@pytest.mark.parametrize("template", NEUTRAL_TEMPLATES)
@pytest.mark.parametrize("word", ["teapot", "sks", "<disc>"])
def test_word_position_points_at_the_word_in_every_template(tok, template, word):
    pos = word_position(tok, template, word)
    ids = tok(fill(template, word)).input_ids
    word_ids = tok(word, add_special_tokens=False).input_ids
    assert ids[pos : pos + len(word_ids)] == word_ids
    # the prefix is exactly the template's words before the slot
    prefix = template.split("{}")[0].strip()
    assert ids[1:pos] == tok(prefix, add_special_tokens=False).input_ids


def test_word_position_with_word_first_and_in_the_middle(tok):
    assert word_position(tok, "{} on the beach", "dog") == 1
    assert tok(fill("{} on the beach", "dog")).input_ids[1] == 1929
    pos = word_position(tok, "a close-up photo of a {} on the beach", "dog")
    assert tok(fill("a close-up photo of a {} on the beach", "dog")).input_ids[pos] == 1929


def test_fill_replaces_the_slot():
    assert fill("a photo of a {}", "teddy") == "a photo of a teddy"
    assert all("{}" in t for t in NEUTRAL_TEMPLATES)


def test_phrase_ids(tok):
    assert phrase_ids(tok, "dog") == phrase_ids(tok, "Dog") == [1929]
    assert tok.convert_ids_to_tokens(phrase_ids(tok, "teddybear")) == ["teddy", "bear</w>"]
    assert tok.convert_ids_to_tokens(phrase_ids(tok, "penguin plushie")) == ["penguin</w>", "plu", "shie</w>"]


@pytest.mark.parametrize("template", NEUTRAL_TEMPLATES[:5] + ("{} on the beach", "a photo of a {} on the beach"))
@pytest.mark.parametrize("phrase", ["dog", "teddybear", "penguin plushie", "kids table chair"])
def test_a_phrase_has_the_same_ids_inside_a_prompt_and_its_last_position(tok, template, phrase):
    """CLIP's BPE splits on whitespace first: the phrase's ids alone are the ids in the prompt."""
    ids = tok(fill(template, phrase)).input_ids
    first, last = word_position(tok, template, phrase), phrase_last_position(tok, template, phrase)
    assert ids[first:last + 1] == phrase_ids(tok, phrase)
    if phrase == "dog":
        assert first == last


@pytest.mark.parametrize("phrase", ["", "   ", None, "dog\n", "dog\x00"])
def test_phrase_ids_refuses_empty_and_control_characters(tok, phrase):
    with pytest.raises(BadInputError, match="empty|control"):
        phrase_ids(tok, phrase)


def test_phrase_ids_refuses_a_sentence(tok):
    with pytest.raises(BadInputError, match=f"at most {PHRASE_MAX}"):
        phrase_ids(tok, " ".join(["dog"] * (PHRASE_MAX + 1)))


@pytest.mark.parametrize("token", ["dog", "Dog", "sks", "teddy", "<|endoftext|>"])
def test_check_new_token_refuses_known_words(tok, token):
    with pytest.raises(BadInputError, match="already in the vocabulary") as info:
        check_new_token(tok, token)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("token", ["<my-teddy>", "<disc>", "<sks-1>", "zzqxv"])
def test_check_new_token_accepts_new_strings(tok, token):
    assert len(tok(token, add_special_tokens=False).input_ids) > 1  # not one known token
    check_new_token(tok, token)  # no error


@pytest.mark.parametrize("token", ["", "my teddy", "tab\there"])
def test_check_new_token_refuses_spaces_and_empty(tok, token):
    with pytest.raises(BadInputError, match="without spaces"):
        check_new_token(tok, token)
