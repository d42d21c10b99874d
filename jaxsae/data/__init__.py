"""Text corpora, token packing and positions in the packed stream, the activation store and its reader,
collection, token windows."""
from jaxsae.data.text import (
    FilesSource,
    HFDatasetSource,
    StdlibSource,
    TextSource,
    make_source,
    stdlib_files,
)
from jaxsae.data.packing import Position, batch_contexts, iter_contexts, pack_tokens

__all__ = ["FilesSource", "HFDatasetSource", "StdlibSource", "TextSource", "batch_contexts", "iter_contexts",
           "make_source", "pack_tokens", "Position", "stdlib_files"]
