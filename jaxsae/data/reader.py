"""Shuffled, deterministic, prefetching batches from an activation store.

The rows one process sees form an infinite stream: epoch 0's order, then epoch 1's, and so on,
each epoch a permutation of that process's rows. Batch ``s`` is stream[s*B : (s+1)*B], so it is a
pure function of (seed, s): a run resumed with ``start_step=s`` sees exactly the batches an
uninterrupted one would, and every row appears exactly once per epoch (a batch may straddle two
epochs when B does not divide the row count).

Reads are large and chunk-aligned, never row by row. The store is cut into *blocks* of whole read
chunks; process p of P owns blocks p, p+P, p+2P, ... (interleaved, so each process spans the whole
store; the union over processes is every row once). Each epoch permutes the process's blocks with
a seed from (seed, process, epoch) and groups them into *windows* of ``window_blocks`` blocks; a
window is loaded with one concurrent read per block and its rows are shuffled with a seed from
(seed, process, epoch, window). Batches therefore mix rows from many blocks across the store.
A background thread assembles batches into a bounded queue, while the next window's reads are in
flight and a helper thread joins its blocks, so the training step should not wait on I/O.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable, Iterator

import numpy as np

from jaxsae.data.store import ActivationStore, PathLike, StoreError, open_store

_BLOCK_TAG, _ROW_TAG = 0, 1  # keep the block-permutation and row-shuffle seed streams apart


class ShuffledReader:
    """Iterator of f32[batch_size, d_model] batches (divided by the store's scale if ``normalize``).

    block_rows: rows per block read (a multiple of the store's ``chunk_rows``; default: one chunk).
    window_bytes: size of the shuffle window (default 256 MB of stored rows), or window_blocks: its
        size in blocks. Up to ~3 windows are in memory at once (current, next, the next being joined).
    """

    def __init__(self, store: ActivationStore | PathLike, batch_size: int, seed: int, start_step: int = 0,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 2, normalize: bool = True,
                 block_rows: int | None = None, window_bytes: int = 256 << 20,
                 window_blocks: int | None = None):
        self.store = store if isinstance(store, ActivationStore) else open_store(store)
        if batch_size < 1 or seed < 0 or start_step < 0 or prefetch < 1:
            raise ValueError("batch_size and prefetch must be >= 1, seed and start_step >= 0")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
        self.batch_size, self.seed, self.normalize = batch_size, seed, normalize
        self.process_index, self.process_count = process_index, process_count
        self.inv_scale = np.float32(self.store.inv_scale() if normalize else 1.0)
        chunk = self.store.chunk_rows
        self.block_rows = block_rows or chunk
        if self.block_rows % chunk:
            raise ValueError(f"block_rows={self.block_rows} must be a multiple of the store's "
                             f"chunk_rows={chunk}")
        n = self.store.n_tokens
        starts = np.arange(0, n, self.block_rows)[process_index::process_count]
        if len(starts) == 0:
            raise StoreError(f"store {self.store.url} has {n} rows, fewer than one {self.block_rows}-row "
                             f"block for each of {process_count} processes; use smaller block_rows or "
                             "fewer processes")
        self._starts = starts  # this process's blocks: rows [start, min(start + block_rows, n))
        self._sizes = np.minimum(starts + self.block_rows, n) - starts
        self.n_rows = int(self._sizes.sum())  # rows per epoch for this process
        row_bytes = self.store.d_model * (2 if self.store.dtype == "bfloat16" else 4)
        self.window_blocks = window_blocks or max(1, window_bytes // (self.block_rows * row_bytes))
        self.step = start_step  # batches handed to the caller so far
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # epoch -> (block order, window ends)
        self._assembler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ShuffledReaderWindow")
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(start_step,), daemon=True,
                                        name="ShuffledReader")
        self._thread.start()

    # -- the deterministic stream ------------------------------------------------------------
    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.process_index, *key]))

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block order, cumulative row count at the end of each window) for ``epoch``."""
        plans = self._plans  # replaced, never mutated: safe to share with the producer thread
        if epoch not in plans:
            order = self._rng(_BLOCK_TAG, epoch).permutation(len(self._starts))
            ends = np.cumsum(self._sizes[order])[self.window_blocks - 1::self.window_blocks]
            if len(ends) == 0 or ends[-1] != self.n_rows:
                ends = np.append(ends, self.n_rows)
            plans = self._plans = {epoch: (order, ends)}
        return plans[epoch]

    def _load_window(self, epoch: int, window: int,
                     background: bool) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Issues the window's block reads now; the returned thunk waits for them and gives
        (rows[n, d_model] in store dtype, the window's row order int[n])."""
        order, _ = self._epoch_plan(epoch)
        blocks = order[window * self.window_blocks:(window + 1) * self.window_blocks]
        futures = [self.store.read_async(int(self._starts[b]), int(self._starts[b] + self._sizes[b]))
                   for b in blocks]
        perm = self._rng(_ROW_TAG, epoch, window).permutation(int(self._sizes[blocks].sum()))
        assemble = lambda: np.concatenate([f.result() for f in futures])  # noqa: E731
        if not background:
            return lambda: (assemble(), perm)
        # Join the blocks on the helper thread, so that copying the window never stalls the batches.
        window_rows = self._assembler.submit(assemble)
        return lambda: (window_rows.result(), perm)

    def _batches(self, start_step: int, background: bool = True) -> Iterator[np.ndarray]:
        """The stream's batches from ``start_step`` on, computed synchronously (the thread drives it)."""
        epoch, offset = divmod(start_step * self.batch_size, self.n_rows)
        window = int(np.searchsorted(self._epoch_plan(epoch)[1], offset, side="right"))
        offset -= int(self._epoch_plan(epoch)[1][window - 1]) if window else 0  # row within the window
        pending = self._load_window(epoch, window, background)
        parts: list[np.ndarray] = []
        have = 0
        while True:
            rows, perm = pending()
            window += 1
            if window == len(self._epoch_plan(epoch)[1]):
                epoch, window = epoch + 1, 0
            pending = self._load_window(epoch, window, background)  # in flight while this window is consumed
            while offset < len(perm):
                take = perm[offset:offset + self.batch_size - have]
                offset += len(take)
                parts.append(rows[take])
                have += len(take)
                if have == self.batch_size:
                    # parts are fresh copies (fancy indexing), so convert and scale in place.
                    x = parts[0] if len(parts) == 1 else np.concatenate(parts)
                    x = x.astype(np.float32, copy=False)
                    if self.normalize:
                        x *= self.inv_scale
                    yield x
                    parts, have = [], 0
            offset = 0

    def batch_at(self, step: int) -> np.ndarray:
        """Batch ``step`` of the stream, f32[batch_size, d_model], computed directly from (seed, step)."""
        return next(self._batches(step, background=False))

    # -- iteration on the background thread -----------------------------------------------------
    def _produce(self, start_step: int) -> None:
        try:
            for batch in self._batches(start_step):
                if not self._put(batch):
                    return
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            self._put(_Failure(e))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self) -> "ShuffledReader":
        return self

    def __next__(self) -> np.ndarray:
        if self._stop.is_set():
            raise RuntimeError("ShuffledReader is closed")
        item = self._queue.get()
        if isinstance(item, _Failure):
            self.close()
            err = item.error
            if isinstance(err, StoreError):  # missing or corrupt rows: the store's own message names the fix
                raise StoreError(str(err)) from err
            raise RuntimeError(f"ShuffledReader failed reading {self.store.url}: {err}") from err
        self.step += 1
        return item

    def close(self) -> None:
        """Stops the background thread (pending reads are abandoned)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._assembler.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ShuffledReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()


    # -- where the stream is ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch of the first row of the next batch."""
        return self.step * self.batch_size // self.n_rows

    @property
    def position(self) -> dict[str, int]:
        """Where the next batch starts: step, epoch and row offset within the epoch."""
        epoch, row = divmod(self.step * self.batch_size, self.n_rows)
        return {"step": self.step, "epoch": epoch, "row_in_epoch": row}


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error
