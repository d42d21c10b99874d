"""Text corpora, token packing and a locally trained BPE tokenizer."""
from jaxsae.data.text import (
    FilesSource,
    HFDatasetSource,
    StdlibSource,
    TextSource,
    TokenStream,
    batch_contexts,
    batched_contexts,
    iter_contexts,
    make_source,
    pack_tokens,
    stdlib_files,
)

__all__ = [
    "FilesSource", "HFDatasetSource", "StdlibSource", "TextSource", "TokenStream",
    "batch_contexts", "batched_contexts", "iter_contexts", "make_source", "pack_tokens",
    "stdlib_files", "train_bpe_tokenizer", "load_tokenizer",
]


def __getattr__(name: str):
    # Lazy: the tokenizer module pulls in transformers, which is slow to import.
    if name in ("train_bpe_tokenizer", "load_tokenizer"):
        from jaxsae.data import tokenizer
        return getattr(tokenizer, name)
    raise AttributeError(f"module 'jaxsae.data' has no attribute {name!r}")
