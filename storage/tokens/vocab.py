"""Do two tokenizers give the data's ids the same tokens? The rule for a teacher and a student.

A model may know more ids than the data's tokenizer (real checkpoints pad their output
layer; a tokenizer may add tokens the data never uses), so what must agree is only the
ids the data can hold: each of `vocab` ids must name the same token in both. Read from
tokenizer.json directly (no `tokenizers` object), so the map is plain JSON that travels
between processes.
"""

from __future__ import annotations

import json


def token_ids(raw: bytes) -> dict[str, str]:
    """id -> token of a tokenizer.json (its model vocabulary and added tokens); string keys
    so the map travels as JSON. Raises ValueError for a file that is not one."""
    doc = json.loads(raw)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    vocab = doc.get("model", {}).get("vocab") or {}
    ids = {str(i): tok for tok, i in vocab.items()} if isinstance(vocab, dict) else {
        str(i): entry[0] for i, entry in enumerate(vocab)}  # Unigram models list [token, score]
    ids.update({str(t["id"]): t["content"] for t in doc.get("added_tokens", [])})
    return ids


def first_difference(theirs: dict[str, str], ours: dict[str, str], vocab: int) -> str | None:
    """"at id I: 'a' != 'b'" for the first of the `vocab` ids the two maps disagree on, else None."""
    for i in map(str, range(vocab)):
        if theirs.get(i) != ours.get(i):
            return f"at id {i}: {theirs.get(i)!r} != {ours.get(i)!r}"
    return None
