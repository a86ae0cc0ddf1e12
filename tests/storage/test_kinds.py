"""The store kinds are spelled once: the `Kind` literal, with each kind's arrays in the layout."""

import typing

from kdcache.storage import ARRAYS_BY_KIND, KINDS, Kind


def test_every_kind_names_its_arrays():
    assert KINDS == typing.get_args(Kind) == tuple(ARRAYS_BY_KIND)
    for arrays in ARRAYS_BY_KIND.values():
        assert arrays[0] == "tokens" and arrays[-1] == "target_logprob"
