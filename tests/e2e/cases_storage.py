"""Catalogue cases: storage. A shard file replaced by another shard's, codec chains without
crc32c, a damaged cache-job log read by the cost model, and a resumed cache whose teacher
measures another validation loss than the store recorded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from kdcache.storage.runs import RunRow, append_run
from tests.e2e.catalogue import CACHE, COST, TRAIN, Case, _edit_store, _store_shard_file

DISTILL = TRAIN + " --out {w}/s --distill {w}/store.zarr"
COST_RUNS = COST + " --runs {w}/timed.parquet"
NAMES = ("tokens", "ids", "logprobs", "tail_logmass", "target_logprob")


def _replace_shards(*names: str) -> Callable[[Path], None]:
    """Shard 0's files copied over every other shard's: whichever shard a short training run
    reads first after shard 0 is another's rows, every inner crc32c intact."""
    def apply(w: Path) -> None:
        shards = len(list((w / "store.zarr" / "ledger").glob("shard-*")))
        for name in names:
            for dst in range(1, shards):
                shutil.copyfile(_store_shard_file(w, name, 0), _store_shard_file(w, name, dst))
    return apply


def _drop_crc32c(name: str, chain: str) -> Callable[[Path], None]:
    """Remove crc32c from the sharding codec's inner `codecs` or its `index_codecs`."""
    def apply(w: Path) -> None:
        path = w / "store.zarr" / name / "zarr.json"
        doc = json.loads(path.read_text())
        config = doc["codecs"][0]["configuration"]
        config[chain] = [c for c in config[chain] if c["name"] != "crc32c"]
        path.write_text(json.dumps(doc))
    return apply


def _timed_runs(w: Path) -> None:
    """A runs table whose offline run names the world's store, so `cost --runs` reads its log."""
    row = RunRow(run_id="d0", kind="distill", params=20000, tokens=2000, loss=5.0, teacher_loss=4.0,
                 teacher_params=50000, store=str(w / "store.zarr"), k=8, wall_s=3.0, layers=1, d_model=32)
    append_run(w / "timed.parquet", row)


def _job_log(**changes: object) -> Callable[[Path], None]:
    def apply(w: Path) -> None:
        _timed_runs(w)
        path = w / "store.zarr" / "jobs" / "zarr.json"
        doc = json.loads(path.read_text())
        doc["attributes"]["cache_jobs"][0].update(changes)
        path.write_text(json.dumps(doc))
    return apply


def _torn_job_log(w: Path) -> None:
    _timed_runs(w)
    path = w / "store.zarr" / "jobs" / "zarr.json"
    path.write_text(path.read_text()[:30])


def _reopen_shard(**changes: object) -> Callable[[Path], None]:
    """What `kdcache verify --repair` leaves of a bad shard 1 (the next cache job rewrites it),
    with `changes` made to the store's attribute."""
    def apply(w: Path) -> None:
        shutil.rmtree(w / "store.zarr" / "ledger" / "shard-000001")
        _edit_store(complete=False, teacher_loss=None, padded_mass=None, **changes)(w)
    return apply


def _other_valid_loss(w: Path) -> None:
    doc = json.loads((w / "store.zarr" / "zarr.json").read_text())
    _reopen_shard(valid_loss=doc["attributes"]["kdcache"]["valid_loss"] + 0.01)(w)


CASES: list[Case] = [
    Case("train-distill-shard-file-replaced", DISTILL,
         r"store.zarr/ids/c/(\d+)/0/0: shard \1 array 'ids': decoded crc32c \w+ \(\d+ bytes\) does not "
         r"match \w+ \(\d+ bytes\) in ledger/shard-0+\1\b", _replace_shards("ids")),
    Case("train-distill-shard-all-arrays-replaced", DISTILL,
         r"store.zarr/(\w+)/c/(\d+)/0(/0)?: shard \2 array '\1': decoded crc32c .* ledger/shard-0+\2\b",
         _replace_shards(*NAMES)),
    Case("train-distill-shard-no-crc32c", DISTILL,
         r"store.zarr: store array 'ids': ids/zarr.json field 'codecs': the sharding codec's inner chunks "
         r"carry no crc32c", _drop_crc32c("ids", "codecs")),
    Case("train-distill-shard-index-no-crc32c", DISTILL,
         r"array 'logprobs': logprobs/zarr.json field 'codecs': its shard index carry no crc32c",
         _drop_crc32c("logprobs", "index_codecs")),
    Case("verify-shard-file-replaced", "verify {w}/store.zarr", r"13 bad shard\(s\) \[1, 2, .*, 13\]",
         _replace_shards("ids")),
    Case("verify-no-crc32c", "verify {w}/store.zarr", r"0 bad shard\(s\) \[\], 1 store problem",
         _drop_crc32c("tokens", "codecs")),
    Case("inspect-no-crc32c", "inspect {w}/store.zarr", r"store.zarr: damaged \(1 problem",
         _drop_crc32c("target_logprob", "index_codecs")),
    Case("cost-joblog-seconds-string", COST_RUNS,
         r"store.zarr/jobs/zarr.json: cache_jobs\[0\]: field 'seconds' must be a finite number of seconds "
         r"in \(0, 1e\+09\), got 'abc'", _job_log(seconds="abc")),
    Case("cost-joblog-seconds-absurd", COST_RUNS,
         r"jobs/zarr.json: cache_jobs\[0\]: field 'seconds' .* got 1e\+30", _job_log(seconds=1e30)),
    Case("cost-joblog-seconds-negative", COST_RUNS,
         r"jobs/zarr.json: cache_jobs\[0\]: field 'seconds' .* got -4", _job_log(seconds=-4)),
    Case("cost-joblog-tokens-float", COST_RUNS, r"jobs/zarr.json: cache_jobs\[0\]: field 'tokens' must be an "
         r"integer", _job_log(tokens=12.5)),
    Case("cost-joblog-workers-zero", COST_RUNS, r"cache_jobs\[0\]: field 'workers' must be an integer in \[1",
         _job_log(workers=0)),
    Case("cost-joblog-truncated", COST_RUNS,
         r"store.zarr/jobs/zarr.json: the cache-job log is not readable JSON", _torn_job_log),
    Case("cache-resume-other-valid-loss", CACHE + " --out {w}/store.zarr",
         r"store.zarr/zarr.json: attribute 'kdcache': field 'valid_loss' is .* but this job's teacher "
         r"measures .* another teacher \(or other weights\)", _other_valid_loss),
    Case("cache-resume-other-valid-rows", CACHE + " --out {w}/store.zarr --valid-rows 2",
         r"store.zarr/zarr.json: attribute 'kdcache': field 'valid_tokens' is \d+ but this job measures the "
         r"teacher on \d+ valid tokens", _reopen_shard()),
    Case("cache-resume-no-crc32c", CACHE + " --out {w}/store.zarr",
         r"store.zarr: store array 'ids': ids/zarr.json field 'codecs'",
         lambda w: (_reopen_shard()(w), _drop_crc32c("ids", "codecs")(w))),
]
