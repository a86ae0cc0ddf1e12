"""`StoreDataset` throughput against `StoreReader.read_rows` alone, in one run.

Builds a k = 64, V = 32,768 top-k store through `StoreWriter` from realistic synthetic
teacher distributions (`synthetic.topk_family`; `--distinct` rows generated, tiled to
`--rows`, so each inner chunk compresses as real rows do), or takes a store already
written (`--store`, e.g. by `kdcache cache`), then measures over one epoch in `RowOrder`,
one process unless said otherwise:

- `reader`: `read_rows` of each window's sorted rows, one call per window: the loader's
  pattern, and its limit;
- `to_tensor`: turning the read windows into batch dicts, nothing read;
- `to_tensor_widened`: the same, then the log-probs widened to float32 (as the loader
  delivered them before it kept float16);
- `dataset`: iterating `StoreDataset` (reads, conversion, batch dicts);
- `loader_2`: `StoreDataset.loader(num_workers=2)` after its first batch (start-up apart),
  its workers started from a fork server (the default);
- `loader_2_fork`: the same with workers forked from this process, for what the fork
  server costs in start-up and throughput;
- `dataloader_2`: a plain `DataLoader(ds, num_workers=2)` from a fork server (each worker
  decodes every window).

Reported as tokens/s, best of `--repeats`, with dataset / reader: the share of
the reader's speed the loader delivers.

    python benchmarks/store_dataset.py [--json] [--rows 1024] [--distinct 16] [--seq-len 256]
        [--batch-size 8] [--repeats 3] [--store PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from synthetic import best_time, write_topk_store

from kdcache.train.dataset import StoreDataset

K, VOCAB, SHARD_ROWS = 64, 32768, 64


def _epoch(ds: StoreDataset) -> None:
    ds.set_epoch(0)
    for _ in ds:
        pass


def _steady(batches: Iterable[object], batch_tokens: int) -> tuple[float, float]:
    """(seconds to the first batch, tokens/s after it): worker start-up apart from throughput."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() - t0 for _ in batches]
    return stamps[0], (len(stamps) - 1) * batch_tokens / (stamps[-1] - stamps[0])


def _workers(ds: StoreDataset, batches: Callable[[], Iterable[object]], repeats: int
             ) -> tuple[float, float]:
    """Best start-up and steady tokens/s of `repeats` epochs of `batches()`."""
    runs = []
    for _ in range(repeats):
        ds.set_epoch(0)
        runs.append(_steady(batches(), ds.local_batch * ds.seq_len))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def measure(path: Path, batch_size: int, repeats: int) -> dict:
    ds = StoreDataset(path, batch_size=batch_size, seed=0)
    meta, reader = ds.meta, ds.reader
    windows = [np.unique(w) for w in ds.order.windows(0)]
    tokens = len(ds) * ds.local_batch * meta.seq_len
    loader_start_s, loader_rate = _workers(ds, lambda: ds.loader(num_workers=2), repeats)
    fork_start_s, fork_rate = _workers(
        ds, lambda: ds.loader(num_workers=2, multiprocessing_context="fork"), repeats)
    dataloader_start_s, dataloader_rate = _workers(
        ds, lambda: DataLoader(ds, batch_size=None, num_workers=2,
                               multiprocessing_context="forkserver"), repeats)
    reader_s = best_time(lambda: [reader.read_rows(w) for w in windows], repeats)
    # The conversion alone: the windows read once, then turned into batch dicts.
    read = [reader.read_rows(w) for w in windows]

    def convert() -> None:
        for rows, values, window in zip(windows, read, ds.order.windows(0), strict=True):
            for batch in window:
                ds._as_dict(ds._to_batch(values, np.searchsorted(rows, batch)))

    def convert_widened() -> None:  # as the loader did before: log-probs float32 here
        for rows, values, window in zip(windows, read, ds.order.windows(0), strict=True):
            for batch in window:
                ds._as_dict(ds._to_batch(values, np.searchsorted(rows, batch)))["teacher_logprobs"].float()

    convert_s = best_time(convert, repeats)
    widened_s = best_time(convert_widened, repeats)
    dataset_s = best_time(lambda: _epoch(ds), repeats)
    rate = {name: tokens / s for name, s in [
        ("reader", reader_s), ("to_tensor", convert_s), ("to_tensor_widened", widened_s),
        ("dataset", dataset_s)]}
    rate.update(loader_2=loader_rate, loader_2_fork=fork_rate, dataloader_2=dataloader_rate)
    return {
        "store": str(path), "k": meta.k, "vocab": meta.vocab_size, "seq_len": meta.seq_len,
        "chunk_rows": meta.chunk_rows, "rows": meta.rows, "batch_size": batch_size,
        "epoch_tokens": tokens, "torch_threads": torch.get_num_threads(),
        **{f"{name}_tokens_per_s": value for name, value in rate.items()},
        "dataset_over_reader": rate["dataset"] / rate["reader"],
        "loader_2_over_dataset": rate["loader_2"] / rate["dataset"],
        "to_tensor_share_of_dataset": convert_s / dataset_s,
        "loader_2_first_batch_s": loader_start_s, "loader_2_fork_first_batch_s": fork_start_s,
        "dataloader_2_first_batch_s": dataloader_start_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--distinct", type=int, default=16, help="rows generated, then tiled")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", help="measure this store (a path or an s3:// URL) instead of building one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store
        if path is None:
            path = Path(tmp) / "store.zarr"
            write_topk_store(path, args.rows, args.distinct, args.seq_len, VOCAB, K, SHARD_ROWS)
        result = measure(path, args.batch_size, args.repeats)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print("| measured | tokens/s |")
    print("|---|---|")
    for name in ("reader", "to_tensor", "to_tensor_widened", "dataset", "loader_2", "loader_2_fork",
                 "dataloader_2"):
        print(f"| {name} | {result[f'{name}_tokens_per_s']:,.0f} |")
    print(f"\ndataset / reader = {result['dataset_over_reader']:.3f}; to-tensor share "
          f"{result['to_tensor_share_of_dataset']:.3f}")


if __name__ == "__main__":
    main()
