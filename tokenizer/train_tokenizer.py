"""Train a SentencePiece tokenizer on the training texts of the builtin tasks and save it HF-style.

The result loads with ``AutoTokenizer.from_pretrained(OUT)`` (a fast tokenizer: ``[CLS] x [SEP]``,
``[PAD]``, ``[UNK]``, ``[MASK]``, word_ids for NER alignment). Only the *train* splits are read, so no
validation or test text leaks into the vocabulary. The committed default (tokenizer/default) was made with:

    python tokenizer/train_tokenizer.py --out tokenizer/default --vocab-size 8000 --model-type unigram
"""

import argparse
import tempfile
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import SentencePieceBPETokenizer
from tokenizers.processors import TemplateProcessing
from transformers import AlbertTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from megamoe.data.builtin import BUILTIN_DATASETS, load_builtin

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SPECIAL_TOKEN_ROLES = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}


def training_texts(names: list[str], cache_dir: str | None) -> list[str]:
    texts = []
    for name in names:
        train = load_builtin(name, cache_dir)["train"]
        column = "text" if "text" in train.column_names else "tokens"
        texts += [" ".join(row) if column == "tokens" else row for row in train[column]]
    return texts


def _unigram(corpus: Path, workdir: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """SentencePiece unigram (the `sentencepiece` trainer), served by the ALBERT fast tokenizer."""
    prefix = workdir / "spiece"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=SPECIAL_TOKENS[2:],
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        character_coverage=1.0,  # every character of the training text gets a piece: no [UNK] on it
        hard_vocab_limit=False,  # a small corpus may not support vocab_size pieces: use fewer, not fail
        num_threads=2,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(str(prefix) + ".model").read_bytes())
    return AlbertTokenizer(
        vocab=[(piece.piece, piece.score) for piece in proto.pieces],
        _spm_precompiled_charsmap=proto.normalizer_spec.precompiled_charsmap,
        do_lower_case=False,
        keep_accents=True,
        **SPECIAL_TOKEN_ROLES,
    )


def _bpe(corpus: Path, vocab_size: int) -> PreTrainedTokenizerBase:
    """SentencePiece-style BPE (metaspace pre-tokenization, the `tokenizers` trainer)."""
    bpe = SentencePieceBPETokenizer()
    bpe.train([str(corpus)], vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    bpe.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(token, bpe.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **SPECIAL_TOKEN_ROLES)


def train_tokenizer(
    texts: list[str], out: Path, *, vocab_size: int, model_type: str
) -> PreTrainedTokenizerBase:
    """Train on ``texts`` and save an HF tokenizer in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(line.replace("\n", " ") for line in texts if line.strip()))
        tokenizer = (
            _unigram(corpus, Path(tmp), vocab_size) if model_type == "unigram" else _bpe(corpus, vocab_size)
        )
    tokenizer.save_pretrained(str(out))
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output directory (HF tokenizer files)")
    parser.add_argument(
        "--datasets", nargs="*", default=sorted(BUILTIN_DATASETS), help="builtin datasets to train on"
    )
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram")
    parser.add_argument(
        "--cache-dir", help="builtin dataset cache (default: $MEGAMOE_CACHE or ~/.cache/megamoe)"
    )
    args = parser.parse_args()
    texts = training_texts(args.datasets, args.cache_dir)
    tokenizer = train_tokenizer(texts, Path(args.out), vocab_size=args.vocab_size, model_type=args.model_type)
    print(
        f"trained a {args.model_type} tokenizer of {len(tokenizer)} tokens on {len(texts)} texts -> {args.out}"
    )


if __name__ == "__main__":
    main()
