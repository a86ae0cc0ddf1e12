"""Cache-versus-online cost model: FLOPs, accelerator-hours and money for M students.

Online distillation runs the teacher forward on every student step; the cache runs it
once over the D tokens, stores the targets, and M students read them back. The FLOPs
are equal at M = 1; storage is what the cache pays extra, so the money break-even is
the smallest M whose saved teacher passes cover the storage bill.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdcache.fit.errors import FitError
from kdcache.fit.flops import forward_flops


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hardware:
    """An accelerator and its storage; defaults are an H100 (dense bf16) at 40% utilisation."""

    peak_flops: float = 989e12
    utilisation: float = 0.4
    price_per_hour: float = 2.5  # accelerator-hour, USD
    storage_per_tb_month: float = 20.0  # USD
    read_bandwidth: float = 2e9  # bytes/s one student can stream from the store
    months: float = 1.0  # how long the store is kept

    def __post_init__(self) -> None:
        if min(self.peak_flops, self.utilisation, self.read_bandwidth) <= 0 or self.utilisation > 1:
            raise FitError("hardware: peak FLOP/s and read bandwidth must be > 0, utilisation in (0, 1]")

    @property
    def flops_per_s(self) -> float:
        return self.peak_flops * self.utilisation


def topk_bytes_per_token(k: int, vocab: int) -> float:
    """Uncompressed bytes per token of a top-k store (README, "The logit store"): ids, fp16 log-probs,
    float32 tail mass and target log-prob, int32 input token."""
    id_bytes = 2 if vocab <= 65536 else 4
    return float(k * (id_bytes + 2) + 4 + 4 + 4)


def _money(flops: float, hw: Hardware) -> tuple[float, float]:
    hours = flops / hw.flops_per_s / 3600.0
    return hours, hours * hw.price_per_hour


def compare(
    teacher_params: float,
    student_params: Sequence[float],
    tokens: float,
    *,
    bytes_per_token: float,
    hardware: Hardware = Hardware(),
    **shape: float,
) -> dict[str, Any]:
    """Online versus cache for students `student_params`, each distilled on `tokens` tokens."""
    if teacher_params <= 0 or tokens <= 0 or not student_params or min(student_params) <= 0:
        raise FitError("teacher params, student params and tokens must be positive")
    students = np.asarray(student_params, dtype=np.float64)
    teacher_pass = forward_flops(teacher_params, **shape) * tokens
    student_flops = float(np.sum(3.0 * forward_flops(students, **shape) * tokens))
    online = student_flops + len(students) * teacher_pass
    cache = student_flops + teacher_pass
    store_bytes = bytes_per_token * tokens
    storage_money = store_bytes / 1e12 * hw_months(hardware)
    online_hours, online_money = _money(online, hardware)
    cache_hours, cache_money = _money(cache, hardware)
    teacher_money = _money(teacher_pass, hardware)[1]
    # Slowest-to-fastest student: the fastest (smallest) one needs the most bandwidth.
    tokens_per_s = hardware.flops_per_s / (3.0 * forward_flops(students, **shape))
    needed = float(np.max(tokens_per_s) * bytes_per_token)
    return {
        "students": len(students),
        "online_flops": online,
        "cache_flops": cache,
        "online_hours": online_hours,
        "cache_hours": cache_hours,
        "online_cost": online_money,
        "cache_cost": cache_money + storage_money,
        "storage_cost": storage_money,
        "store_bytes": store_bytes,
        "bytes_per_token": bytes_per_token,
        "read_bandwidth_needed": needed,
        "read_bandwidth_ok": needed <= hardware.read_bandwidth,
        "break_even_students": break_even(teacher_money, storage_money),
    }


def hw_months(hw: Hardware) -> float:
    """Storage price for the whole retention period, USD per TB."""
    return hw.storage_per_tb_month * hw.months


def break_even(teacher_pass_cost: float, storage_cost: float) -> int:
    """Smallest M with cache <= online: M teacher passes >= 1 pass + storage."""
    if teacher_pass_cost <= 0:
        raise FitError("the teacher pass must cost something")
    return max(1, math.ceil(1.0 + storage_cost / teacher_pass_cost - 1e-12))


def calibrated_flops_per_s(params: np.ndarray, tokens_per_s: np.ndarray, **shape: float) -> float:
    """Achieved training FLOP/s measured by runs: median of 3 F(N) x tokens/s."""
    ok = np.isfinite(tokens_per_s) & (tokens_per_s > 0) & (params > 0)
    if not ok.any():
        raise FitError("runs table has no positive tokens_per_s to calibrate from")
    return float(np.median(3.0 * forward_flops(params[ok], **shape) * tokens_per_s[ok]))
