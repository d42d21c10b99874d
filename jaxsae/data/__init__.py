"""Text corpora and token packing, the activation store and its reader, collection, token windows."""
from jaxsae.data.text import (
    FilesSource,
    HFDatasetSource,
    StdlibSource,
    TextSource,
    batch_contexts,
    iter_contexts,
    make_source,
    pack_tokens,
    stdlib_files,
)

__all__ = ["FilesSource", "HFDatasetSource", "StdlibSource", "TextSource", "batch_contexts", "iter_contexts",
           "make_source", "pack_tokens", "stdlib_files"]
