"""Writes tests/pipeline/data/{saved_dataset,hub_parquet} with Hugging Face `datasets` (5.2.0):
`python tests/pipeline/data/make_datasets.py tests/pipeline/data` in a venv that has it."""

import sys
from pathlib import Path

import datasets

out = Path(sys.argv[1])
words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
texts = [
    " ".join([f"rec{i:03d}x", *(words[(i * 7 + j * 3) % 10] for j in range(40)), f"rec{i:03d}x"])
    for i in range(60)
]
ds = datasets.Dataset.from_dict({"text": texts, "id": list(range(60))})
ds.save_to_disk(str(out / "saved_dataset"))
hub = out / "hub_parquet"
(hub / "data").mkdir(parents=True, exist_ok=True)
for k in range(2):
    ds.shard(2, k, contiguous=True).to_parquet(str(hub / "data" / f"train-0000{k}-of-00002.parquet"))
(hub / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files: data/train-*\n---\n")
