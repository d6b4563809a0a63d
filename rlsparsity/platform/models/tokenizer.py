"""The embedded model's tokenizer: character level over printable ASCII, four special tokens."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII plus space, tab and newline: any prompt style (native or OOD) tokenizes
# without <unk>.
TOKENIZER_CHARS = "".join(c for c in string.printable if c not in "\r\x0b\x0c")


def build_tokenizer(model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer over printable ASCII, with <pad> <bos> <eos> <unk>.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then one id per character. Encoding with
    special tokens prepends <bos> (EOS is appended by whoever builds training targets).
    Padding is on the left, which is what batched generation needs.
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *TOKENIZER_CHARS))}
    tk = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newline included) is its own pre-token; WordLevel maps it to an id.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()  # concatenate characters back, no spaces in between
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tk.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )
