"""A kdcache store is plain Zarr v3: read it in a process that never imports kdcache itself.

Zarr finds kdcache's two codecs (top-k ids and log-probs) through its entry points, so the
only kdcache code such a reader runs is `kdcache.storage.codecs` and what it needs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np

from kdcache.storage import StoreWriter

from .conftest import make_meta, make_rows, shard_of

PLAIN_READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np, zarr
    group = zarr.open_group(sys.argv[1], mode="r")
    meta = group.attrs["kdcache"]
    arrays, stored = {}, {}
    for name in group.array_keys():
        values = group[name][:]
        stored[name] = str(values.dtype)
        arrays[name] = values
    entries = {k: dict(v.attrs) for k, v in group["ledger"].groups()}
    np.savez(sys.argv[2], **arrays)
    print(json.dumps({"meta": meta, "ledger": sorted(entries), "mods": sorted(sys.modules),
                      "stored": stored}))
    """
)


def test_plain_zarr_reads_every_array(store_path, tmp_path):
    meta = make_meta(rows=7, shard_rows=3, chunk_rows=1, vocab=70000, k=5)
    rows = make_rows(meta)
    writer = StoreWriter.open(store_path, meta)
    for shard in writer.pending_shards():
        writer.write_shard(shard, shard_of(meta, rows, shard))
    writer.finalize()
    out = tmp_path / "plain.npz"
    proc = subprocess.run([sys.executable, "-c", PLAIN_READER, str(store_path), str(out)],
                          capture_output=True, text=True, check=True)
    import json

    report = json.loads(proc.stdout)
    loaded = {m for m in report["mods"] if m.startswith("kdcache")}
    assert "kdcache.storage.codecs" in loaded  # through zarr's entry points
    assert "kdcache.train" not in loaded and "torch" not in report["mods"]
    assert report["meta"]["format"] == "kdcache.logits/1"
    assert report["meta"]["complete"] is True
    assert report["ledger"] == ["shard-000000", "shard-000001", "shard-000002"]
    # Top-k log-probs read as float16, through kdcache's registered codec (codecs.py).
    assert report["stored"]["logprobs"] == "float16"
    assert report["stored"]["ids"] == "uint32"
    with np.load(out, allow_pickle=False) as plain:
        assert sorted(plain.files) == sorted(rows)
        for name, values in rows.items():
            assert plain[name].dtype == values.dtype
            assert plain[name].tobytes() == values.tobytes(), name
