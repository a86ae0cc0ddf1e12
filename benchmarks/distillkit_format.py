"""DistillKit's compressed top-k log-prob format, reimplemented for the store-size benchmark.

This is a reimplementation written from DistillKit's documented format (arcee-ai/DistillKit: its
README's "Logit Compression" section and the format its `distillkit/compression` module defines);
no DistillKit code is copied or imported. Settings: the README's recommended configuration,
`exact_k: 16, exact_dtype: bfloat16, polynomial_terms: [0, 1, 2, 3, 4, "sqrt"], term_dtype: float32,
residual_bins: [], delta_encoding: false, error_diffusion: false` (`normalize_t` at its default,
false), with `k` the benchmark's k and `d` the vocabulary size.

The format, per position (one next-token distribution):

* the top-k log-probs, sorted descending (float32 in, as the teacher gives them);
* the first `exact_k` of them rounded to bfloat16 (round to nearest even), 2 bytes each;
* the other `k - exact_k` fitted by least squares with the terms t**0 .. t**4 and sqrt(t) of the
  rank t = 0, 1, ..., k - exact_k - 1 inside that part (not normalised to [0, 1]); the fit is
  solved in float32 through the SVD pseudo-inverse of the design matrix, singular values at or
  below 1e-5 dropped (with torch.linalg.svd, as DistillKit does; see `fit_coefficients`); its
  6 coefficients are stored as float32, 4 bytes each. With no residual bins nothing else is
  stored about them: they decode as the polynomial, evaluated in float32;
* the log-prob bytes are the exact values then the coefficients (little-endian), 32 + 24 = 56
  bytes at any k >= 16;
* the ids in the same order, each in ceil(log2(d)) bits (16 at d = 49,152), packed most
  significant bit first into one bit stream, zero-padded to whole bytes;
* nothing is stored about the mass outside the k: DistillKit's decoder either drops it (its
  "zero" missing-probability mode: the k are renormalised) or takes it as 1 - sum of the decoded
  probabilities spread over the other d - k ids ("symmetric_uniform"); its loss
  (`lossfuncs/kl.py`) floors that rest mass at 1e-8.

Rows go into Parquet as one row per sequence with the schema `input_ids: list<uint64>,
compressed_logprobs: list<list<uint8>>, bytepacked_indices: list<list<uint8>>`, written by
`pyarrow.parquet.ParquetWriter` with its default options (as DistillKit's capture writer does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: The README's recommended configuration (k and d are set per benchmark).
EXACT_K = 16
TERMS: tuple[int | str, ...] = (0, 1, 2, 3, 4, "sqrt")
SVD_TOLERANCE = 1e-5
MISSING_FLOOR = 1e-8


@dataclass(frozen=True)
class Config:
    k: int
    d: int
    exact_k: int = EXACT_K
    terms: tuple[int | str, ...] = TERMS

    @property
    def id_bits(self) -> int:
        return math.ceil(math.log2(self.d))

    @property
    def logprob_bytes(self) -> int:
        return self.exact_k * 2 + (len(self.terms) * 4 if self.k > self.exact_k else 0)

    @property
    def id_bytes(self) -> int:
        return (self.k * self.id_bits + 7) // 8


def schema() -> pa.Schema:
    return pa.schema([
        pa.field("input_ids", pa.list_(pa.uint64())),
        pa.field("compressed_logprobs", pa.list_(pa.list_(pa.uint8()))),
        pa.field("bytepacked_indices", pa.list_(pa.list_(pa.uint8()))),
    ])


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bfloat16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def design(cfg: Config) -> np.ndarray:
    """The (k - exact_k, terms) float32 design matrix over the ranks of the fitted part."""
    t = np.arange(cfg.k - cfg.exact_k, dtype=np.float32)
    cols = [np.sqrt(t) if term == "sqrt" else t ** np.float32(term) for term in cfg.terms]
    return np.stack(cols, axis=-1).astype(np.float32)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) non-negative ints -> (..., ceil(n * bits / 8)) uint8, MSB first, zero-padded."""
    v = values.astype(">u8")[..., None].view(np.uint8)  # (..., n, 8) big-endian bytes
    stream = np.unpackbits(v, axis=-1)[..., 64 - bits:]  # (..., n, bits)
    stream = stream.reshape(*values.shape[:-1], -1)
    return np.packbits(stream, axis=-1)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    stream = np.unpackbits(packed, axis=-1)[..., : n * bits].reshape(*packed.shape[:-1], n, bits)
    weights = (1 << np.arange(bits - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
    return (stream.astype(np.uint64) * weights).sum(-1).astype(np.int64)


def fit_coefficients(y: np.ndarray, cfg: Config, solve: str = "torch-float32") -> np.ndarray:
    """Least-squares coefficients (..., terms), float32, of the fitted part y (..., k - exact_k).

    The documented solve is the SVD pseudo-inverse in the inputs' dtype, float32 here, which
    DistillKit runs with torch.linalg.svd: `solve="torch-float32"`. The design matrix is badly
    conditioned in float32 (t**4 up to 1.5e8 at k = 128), so a float32 solve depends on the SVD
    routine: `"float32"` does it with numpy's, `"float64"` in float64 (the stored format is the
    same; only the coefficients' quality changes).
    """
    x = design(cfg)
    if solve == "torch-float32":
        import torch

        u_t, s_t, vh_t = torch.linalg.svd(torch.from_numpy(x), full_matrices=False)
        u, s, vh = u_t.numpy(), s_t.numpy(), vh_t.numpy()
        dtype: type = np.float32
    else:
        dtype = {"float32": np.float32, "float64": np.float64}[solve]
        u, s, vh = np.linalg.svd(x.astype(dtype), full_matrices=False)
    sinv = np.where(s > SVD_TOLERANCE, 1 / np.where(s > SVD_TOLERANCE, s, 1), 0).astype(dtype)
    return (((y.astype(dtype) @ u) * sinv) @ vh).astype(np.float32)


def encode(ids: np.ndarray, logprobs: np.ndarray, cfg: Config,
           solve: str = "torch-float32") -> tuple[np.ndarray, np.ndarray]:
    """(..., k) ids and float32 log-probs -> (..., logprob_bytes) and (..., id_bytes) uint8."""
    order = np.argsort(-logprobs, axis=-1, kind="stable")
    values = np.take_along_axis(logprobs.astype(np.float32), order, -1)
    ids = np.take_along_axis(ids, order, -1)
    chunks = [to_bfloat16_bits(values[..., : cfg.exact_k]).astype("<u2").view(np.uint8)]
    if cfg.k > cfg.exact_k:
        coeffs = fit_coefficients(values[..., cfg.exact_k:], cfg, solve)
        chunks.append(np.ascontiguousarray(coeffs.astype("<f4")).view(np.uint8))
    return np.concatenate(chunks, -1), pack_bits(ids, cfg.id_bits)


def decode(logprob_bytes: np.ndarray, id_bytes: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode`: (..., k) int64 ids and float32 log-probs (sorted descending)."""
    exact_end = cfg.exact_k * 2
    exact = from_bfloat16_bits(np.ascontiguousarray(logprob_bytes[..., :exact_end]).view("<u2"))
    parts = [exact]
    if cfg.k > cfg.exact_k:
        coeffs = np.ascontiguousarray(logprob_bytes[..., exact_end:cfg.logprob_bytes]).view("<f4")
        parts.append((design(cfg) * coeffs[..., None, :]).sum(-1, dtype=np.float32))
    return unpack_bits(id_bytes, cfg.id_bits, cfg.k), np.concatenate(parts, -1).astype(np.float32)


def _nested(flat: np.ndarray, inner: int, rows: int) -> pa.Array:
    """(rows, positions, inner) uint8 -> list<list<uint8>> with one outer list per row."""
    positions = flat.shape[1]
    values = pa.array(flat.reshape(-1), type=pa.uint8())
    lists = pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, inner, dtype=np.int32)), values)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * positions + 1, positions, dtype=np.int32)),
                                    lists)


def write_parquet(path: Path, tokens: np.ndarray, logprob_bytes: np.ndarray, id_bytes: np.ndarray) -> int:
    """One Parquet row per sequence; returns the file's size in bytes."""
    rows, seq = tokens.shape
    input_ids = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * seq + 1, seq, dtype=np.int32)),
                                         pa.array(tokens.reshape(-1).astype(np.uint64)))
    table = pa.Table.from_arrays(
        [input_ids, _nested(logprob_bytes, logprob_bytes.shape[-1], rows),
         _nested(id_bytes, id_bytes.shape[-1], rows)], schema=schema())
    with pq.ParquetWriter(str(path), schema=schema()) as writer:
        writer.write_table(table)
    return path.stat().st_size


def read_parquet(path: Path, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> tokens (rows, seq), log-prob bytes (rows, positions, B), id bytes (rows, positions, B')."""
    table = pq.read_table(str(path))
    rows = table.num_rows

    def flat(name: str, width: int) -> np.ndarray:
        col = table.column(name).combine_chunks()
        return col.flatten().flatten().to_numpy().astype(np.uint8).reshape(rows, -1, width)

    tokens = table.column("input_ids").combine_chunks().flatten().to_numpy().reshape(rows, -1)
    return tokens, flat("compressed_logprobs", cfg.logprob_bytes), flat("bytepacked_indices", cfg.id_bytes)


def tail_mass(logprobs: np.ndarray) -> np.ndarray:
    """The mass DistillKit's "symmetric_uniform" decoder gives the d - k other ids, float64,
    floored at 1e-8 as its KL loss floors it."""
    rest = 1 - np.exp(logprobs.astype(np.float64)).sum(-1)
    return np.maximum(rest, MISSING_FLOOR)
