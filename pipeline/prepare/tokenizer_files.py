"""The files that travel with a given tokenizer into a DATA directory, whatever the format.

tokenizer.json alone says how text becomes ids, not which ids are special, how a chat is
rendered, or where generation stops. A student saved from data prepared with a teacher's
tokenizer is a drop-in replacement for it only when it carries the teacher's
tokenizer_config.json, special_tokens_map.json, chat_template.jinja and
generation_config.json too, so prepare copies those found beside tokenizer.json byte for
byte (`kdcache train` copies them on into the student). They are read once, before any
work, so a serial run and a Ray run write the same bytes; a JSON file that does not parse
is refused then, naming it, rather than breaking the student's `from_pretrained` later.
"""

from __future__ import annotations

from pathlib import Path

from kdcache.pipeline.errors import PipelineError
from kdcache.pipeline.prepare.chat import TEMPLATE_FILE, ChatTemplate, json_object
from kdcache.storage.tokens.format import TOKENIZER_FILES as CARRIED


def carried(tokenizer_json: str, template: ChatTemplate | None, override: str | None) -> dict[str, bytes]:
    """Name -> bytes of the files beside `tokenizer_json` that DATA carries. The chat
    template in use replaces chat_template.jinja: `template` (chat and completion data, as
    rendered), else the `override` file (--chat-template) as found."""
    where = Path(tokenizer_json).parent
    files: dict[str, bytes] = {}
    for name in CARRIED:
        path = where / name
        if not path.is_file():
            continue
        try:
            files[name] = path.read_bytes()
        except OSError as exc:
            raise PipelineError(f"{path}: cannot read it ({exc.strerror}) (field 'tokenizer')") from exc
        if name.endswith(".json"):
            json_object(path, files[name])
    if template is not None:
        files |= template.files
    elif override is not None:
        files[TEMPLATE_FILE] = Path(override).read_bytes()
    return files
