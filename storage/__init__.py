"""The logit store: a Zarr v3 group of teacher targets, written shard by shard through a ledger.

Numpy and zarr only (no torch), so any tool can read and check a store.
"""

import warnings

from kdcache.storage.errors import StoreError
from kdcache.storage.integrity import Problem
from kdcache.storage.joblog import JOB_LOG, CacheJob, append_job, read_jobs
from kdcache.storage.layout import ARRAYS_BY_KIND, DOCUMENT_ARRAYS, array_specs, id_dtype, suggest_chunk_rows
from kdcache.storage.ledger import ShardEntry
from kdcache.storage.metadata import KINDS, DataInfo, Kind, StoreMeta, TeacherInfo
from kdcache.storage.reader import StoreReader
from kdcache.storage.verify import repair_store, summarize, verify_store
from kdcache.storage.writer import StoreWriter, read_attrs, read_meta

# Zarr warns on every open of an array using numcodecs' `delta` (top-k log-probs, see
# layout.py) that such codecs are outside the Zarr v3 spec; docs/store-format.md says what that costs.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

__all__ = [
    "ARRAYS_BY_KIND",
    "DOCUMENT_ARRAYS",
    "JOB_LOG",
    "KINDS",
    "CacheJob",
    "DataInfo",
    "Kind",
    "Problem",
    "ShardEntry",
    "StoreError",
    "StoreMeta",
    "StoreReader",
    "StoreWriter",
    "TeacherInfo",
    "append_job",
    "array_specs",
    "id_dtype",
    "read_attrs",
    "read_jobs",
    "read_meta",
    "repair_store",
    "suggest_chunk_rows",
    "summarize",
    "verify_store",
]
