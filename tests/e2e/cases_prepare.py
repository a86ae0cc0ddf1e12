"""Catalogue cases: prepare."""

from __future__ import annotations

from tests.e2e.catalogue import Case

CASES: list[Case] = []
