"""A character-level tokenizer for the embedded default, as a normal HF tokenizer.

Every character is one token. The vocabulary is fixed and ordered, so ids are
the same on every machine and in every run:

====  =========  ==========================================================
id    token      why
====  =========  ==========================================================
0     ``<pad>``  padding (left: prompts are padded on the left for generation)
1     ``<bos>``  prepended to every encoded text (``add_special_tokens=True``)
2     ``<eos>``  ends a completion; the trainer appends it to references
3     ``<unk>``  any character outside the alphabet
4..   ALPHABET   ``"\\n"``, ``"\\t"``, then printable ASCII 32..126 in order
====  =========  ==========================================================

followed by ``extra_chars`` (those not already present) in the order given.
Printable ASCII covers the arithmetic task, its prompts, the sentinel and
hints, and LaTeX such as ``\\boxed{3/4}``.

Built with ``tokenizers``: a WordLevel model over single characters, a
pre-tokenizer that isolates every character (spaces and newlines included), a
``<bos> $A`` template post-processor and a ``Fuse`` decoder, which joins the
tokens with nothing in between, so that decoding is the exact inverse of
encoding for any text over the alphabet.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from workbench.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

ALPHABET = "\n\t" + "".join(chr(code) for code in range(32, 127))
"""The fixed, ordered characters with ids 4, 5, ...: newline, tab, printable ASCII."""


def build_char_tokenizer(
    extra_chars: str = "", model_max_length: int = 1024
) -> PreTrainedTokenizerFast:
    """Build the character-level tokenizer.

    Args:
        extra_chars: Characters to add after :data:`ALPHABET` (for data beyond
            ASCII); duplicates and characters already present are skipped.
        model_max_length: Longest sequence the model takes, in tokens.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>``=0, ``<bos>``=1, ``<eos>``=2,
        ``<unk>``=3, left padding, and ``<bos>`` prepended when
        ``add_special_tokens=True``. ``save_pretrained`` writes a folder that
        ``AutoTokenizer.from_pretrained`` loads back unchanged.

    Raises:
        ConfigError: if ``model_max_length`` is not a positive integer.
    """
    if isinstance(model_max_length, bool) or not isinstance(model_max_length, int):
        raise ConfigError(f"model_max_length must be an integer, got {model_max_length!r}")
    if model_max_length < 1:
        raise ConfigError(f"model_max_length must be >= 1, got {model_max_length}")
    characters = list(dict.fromkeys(ALPHABET + extra_chars))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for character in characters:
        vocab[character] = len(vocab)

    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # No normalizer: text must come back byte for byte. "[\s\S]" matches any
    # one character, newline included (Oniguruma's "." does not);
    # "isolated" keeps each as its own piece.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, BOS_ID)],
    )
    # Fuse concatenates tokens with no separator (the default would join
    # WordLevel tokens with spaces).
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="left",
        # The default clean-up rewrites " ." to "." and the like; characters
        # are tokens here, so decoding must not touch spaces.
        clean_up_tokenization_spaces=False,
    )
