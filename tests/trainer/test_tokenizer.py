"""Tests for trainer.tokenizer: the character-level HF tokenizer."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trainer.tasks import SENTINEL, ArithmeticTask
from trainer.tokenizer import (
    ALPHABET,
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    build_char_tokenizer,
)
from workbench.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_special_token_ids(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id) == (0, 1)
    assert (tokenizer.eos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert tokenizer.padding_side == "left"
    assert tokenizer.model_max_length == 1024


def test_alphabet_covers_task_text_and_ids_are_stable(tokenizer):
    assert len(tokenizer) == 4 + len(ALPHABET) == 101
    needed = set("0123456789+-*=.,:() \n\\{}") | set(SENTINEL)
    needed |= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert needed <= set(ALPHABET)
    assert len(set(ALPHABET)) == len(ALPHABET)
    # Fixed order: "\n" first, then "\t", then printable ASCII from " ".
    assert tokenizer.convert_tokens_to_ids(["\n", "\t", " ", "0", "A", "a", "~"]) == [
        4, 5, 6, 6 + 16, 6 + 33, 6 + 65, 100,
    ]


@pytest.mark.parametrize("character", list(ALPHABET))
def test_every_character_is_one_token_and_round_trips(tokenizer, character):
    ids = tokenizer(character, add_special_tokens=False)["input_ids"]
    assert ids == [4 + ALPHABET.index(character)]
    assert tokenizer.decode(ids) == character
    # Inside text too: spaces around it must be neither dropped nor added.
    text = f" {character}  {character}\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == 1 + len(text)
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_prompt_encoding_is_bos_plus_characters(tokenizer):
    ids = tokenizer("1+2\n")["input_ids"]
    assert ids == [BOS_ID] + [4 + ALPHABET.index(c) for c in "1+2\n"]
    assert tokenizer("1+2\n", add_special_tokens=False)["input_ids"] == ids[1:]
    assert tokenizer("")["input_ids"] == [BOS_ID]


def test_task_strings_round_trip(tokenizer):
    task = ArithmeticTask(n_train=20, n_test=5, operators="+-*", allow_negative=True)
    for example in task.train_examples() + task.test_examples():
        for text in (example.prompt, example.teacher_prompt, example.reference):
            ids = tokenizer(text)["input_ids"]
            assert UNK_ID not in ids
            assert tokenizer.decode(ids, skip_special_tokens=True) == text
        completion = tokenizer(example.reference, add_special_tokens=False)["input_ids"] + [EOS_ID]
        assert tokenizer.decode(completion, skip_special_tokens=True) == example.reference
    boxed = "So \\boxed{3/4}. Answer: 0.75 (x_1 ^ 2)"
    assert tokenizer.decode(tokenizer(boxed)["input_ids"], skip_special_tokens=True) == boxed


def test_unknown_characters_map_to_unk(tokenizer):
    ids = tokenizer("aé€🙂b")["input_ids"]
    a, b = 4 + ALPHABET.index("a"), 4 + ALPHABET.index("b")
    assert ids == [BOS_ID, a, UNK_ID, UNK_ID, UNK_ID, b]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    assert tokenizer.decode(ids) == "<bos>a<unk><unk><unk>b"


def test_extra_chars_are_appended_after_the_alphabet():
    tokenizer = build_char_tokenizer(extra_chars="é€aé")
    assert len(tokenizer) == 4 + len(ALPHABET) + 2
    assert tokenizer.convert_tokens_to_ids(["é", "€"]) == [101, 102]
    ids = tokenizer("é € a")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "é € a"


def test_left_padding_batch(tokenizer):
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][:2] == [PAD_ID, PAD_ID]
    assert batch["attention_mask"] == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]


def test_save_and_load_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Compute 23+45-17.|Hint: 23+45=68. 68-17=51. Answer: 51.\n  \t{}\\ é"
    ids = tokenizer(text)["input_ids"]
    assert loaded(text)["input_ids"] == ids
    assert loaded.decode(ids, skip_special_tokens=True) == tokenizer.decode(
        ids, skip_special_tokens=True
    )
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
        0, 1, 2, 3,
    )
    assert loaded.padding_side == "left"
    assert loaded.model_max_length == tokenizer.model_max_length
    assert loaded(["a", "abc"], padding=True)["input_ids"][0][:2] == [PAD_ID, PAD_ID]


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_model_max_length(bad):
    with pytest.raises(ConfigError, match="model_max_length"):
        build_char_tokenizer(model_max_length=bad)
