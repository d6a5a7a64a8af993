"""Tokenizers: load a Hugging Face one, train a SentencePiece one here, fingerprint either.

A tokenizer trained here is saved as a Hugging Face tokenizer directory (tokenizer.json +
tokenizer_config.json) so that `AutoTokenizer.from_pretrained(dir)` loads it exactly like a
backbone's. SentencePiece does the training (unigram or BPE); its pieces and scores are then
re-expressed as a `tokenizers` model, so encoding runs in the fast Rust tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
from pathlib import Path
from typing import Iterable

from .examples import BuildError

SPECIALS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
# Seed of SentencePiece's sentence sampling, so a retrained tokenizer is the same tokenizer.
SPM_SEED = 1234
USER_SYMBOLS = ["\n", "\t"]
MIN_VOCAB_SIZE = 256 + len(SPECIALS) + len(USER_SYMBOLS) + 1
"""The smallest vocabulary trained here: 256 byte pieces (byte fallback), the special tokens, the
user symbols and one piece of text. A corpus needs more: one piece per character it uses."""
# Ordinary text every real tokenizer encodes to ordinary tokens.
PROBE_TEXT = "Write a short answer: the capital of France is Paris, and 2 + 2 = 4."


def load_tokenizer(ref: str | Path):
    """A `transformers` tokenizer from a directory (a backbone's or one trained here), a .gguf
    file or a hub id (`data_pipeline.pretrained`)."""
    from .pretrained import load_pretrained_tokenizer

    return load_pretrained_tokenizer(ref)


def special_ids(tokenizer) -> set[int]:
    """Ids of every special token, including added ones that no named role lists (Llama-3's
    `<|eot_id|>`), which `all_special_ids` leaves out."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def check_encodes_text(tok, label: str) -> None:
    """A `BuildError` if `tok` encodes ordinary text to nothing or to special tokens only (as a
    tokenizer whose vocabulary files are missing does: transformers then builds one with an empty
    vocabulary, and every document of the build would be a lone EOS)."""
    ids = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if not ids or set(ids) <= special_ids(tok):
        got = "nothing" if not ids else f"special tokens only ({tok.convert_ids_to_tokens(ids[:4])})"
        raise BuildError(
            f"tokenizer {label} encodes ordinary text to {got}: its vocabulary is missing or empty "
            "(give a backbone's tokenizer directory, or --train-tokenizer)"
        )


def tokenizer_fingerprint(tok) -> str:
    """Stable hash of the vocabulary and the special tokens: equal iff token ids mean the same."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    specials = {
        name: [getattr(tok, name, None), getattr(tok, name + "_id", None)]
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    blob = json.dumps({"vocab": vocab, "specials": specials}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, model_type: str = "bpe", max_sentences: int = 200_000
) -> Path:
    """Train on `texts`, save an AutoTokenizer-loadable directory at `out_dir`, return it.

    No text at all, or a vocabulary too small for the corpus's characters, is a one-line
    `BuildError` (SentencePiece would stop with an internal check's message)."""
    import sentencepiece as spm

    texts = iter(texts)
    first = next(texts, None)  # SentencePiece stops on an empty input with `!sentences_.empty()`
    if first is None:
        raise BuildError("no text to train the tokenizer on: the train split holds no example")
    spm.set_random_generator_seed(SPM_SEED)
    model = io.BytesIO()
    try:
        _train_spm(spm, itertools.chain([first], texts), model, vocab_size, model_type, max_sentences)
    except RuntimeError as err:
        need = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(err))
        if need is None:
            raise
        raise BuildError(
            f"vocab_size {need.group(1)} is too small for this corpus: the tokenizer needs at least "
            f"{need.group(2)} pieces (256 bytes, {len(SPECIALS)} special tokens and one per character the text uses)"
        ) from None
    out_dir = Path(out_dir)
    _to_hf(model.getvalue(), model_type).save_pretrained(str(out_dir))
    (out_dir / "spm.model").write_bytes(model.getvalue())
    return out_dir


def _train_spm(spm, sentences: Iterable[str], model, vocab_size: int, model_type: str, max_sentences: int) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences,
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        byte_fallback=True,
        split_digits=True,
        # identity normalisation and kept whitespace: the Rust tokenizer below then needs no
        # normaliser, and code indentation survives the round trip.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=USER_SYMBOLS,
        max_sentence_length=1 << 16,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        num_threads=2,
        hard_vocab_limit=False,
        minloglevel=2,
    )


def _to_hf(model_proto: bytes, model_type: str):
    """The SentencePiece model as a fast `transformers` tokenizer (same pieces, same ids)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    sp = spm.SentencePieceProcessor(model_proto=model_proto)
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    if model_type == "bpe":
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        merges = _bpe_merges(vocab, pieces)
        backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    else:
        backend = Tokenizer(models.Unigram(pieces, unk_id=sp.unk_id(), byte_fallback=True))
    # SentencePiece's dummy prefix: one "▁" before the text, spaces become "▁", no splitting.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [
            decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
            decoders.ByteFallback(),
            decoders.Fuse(),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIALS)


def _bpe_merges(vocab: dict, pieces: list) -> list:
    """Merges for a SentencePiece BPE model, ordered by the score of the merged piece."""
    merges = []
    for piece, score in pieces:
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((score, vocab[piece], left, right))
    merges.sort(key=lambda m: (-m[0], m[1]))
    return [(left, right) for _, _, left, right in merges]
