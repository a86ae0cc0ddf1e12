"""Turn a GGUF teacher (llama.cpp's file format) into a Hugging Face MODEL directory.

transformers reads the GGUF file and dequantises its weights to float32. It refuses to
save a model loaded that way, so the weights move into a plain model of the same class
built from the same config, which is saved with the tokenizer the GGUF file carries.
Before anything appears at `--out`, the written directory is loaded back and checked
against the GGUF-loaded model: same tokens for a sample text, and logits within
`LOGITS_ATOL` in float32. The directory is built under a hidden temporary name and
renamed into place, so a failed import leaves nothing. Only the Llama architecture is
accepted: it is the one whose conversion is checked here and that all three teacher
backends (native when the shape fits kdcache's family, hf, vllm) run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from kdcache.pipeline.cache.config import ImportConfig, ImportResult
from kdcache.pipeline.cache.teachers.hf import weights_fingerprint
from kdcache.pipeline.errors import PipelineError

SUPPORTED_ARCHITECTURES = ("llama",)
LOGITS_ATOL = 1e-4  # float32: the two models run the same weights through the same code
SAMPLE_TEXT = (
    "The capital city of France is Paris. It lies on the Seine, in the north of the country.\n"
    "def mean(values):\n    return sum(values) / len(values)\n"
)


def import_gguf(cfg: ImportConfig) -> ImportResult:
    """Write the MODEL directory `cfg.out` from `cfg.gguf`; see the module docstring."""
    t0 = time.perf_counter()
    src, out = Path(cfg.gguf), Path(cfg.out)
    if out.exists():
        raise PipelineError(f"{out}: output already exists (field 'out')")
    header = read_header(src)
    say = _Stages(quiet=cfg.quiet)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        say(f"{src.name}: {header['architecture']}, {header['tensors']} tensors "
            f"({header['tensor_types']}); dequantising to float32")
        model, tokenizer = load_gguf(src, quiet=cfg.quiet)
        say(f"writing {out.name} (safetensors, config, tokenizer)")
        tmp.mkdir(parents=True)
        save_plain(model, tokenizer, tmp)
        say("checking the written model against the GGUF model")
        diff = check_conversion(model, tokenizer, tmp)
        _write_provenance(tmp, src, header, diff)
        os.replace(tmp, out)  # the only moment the directory appears: whole or not at all
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"done: max |logit difference| {diff:.2e}")
    return _result(model, tokenizer, out, diff, time.perf_counter() - t0)


def read_header(path: Path) -> dict[str, Any]:
    """Validate the file before the slow load: readable, complete, a supported architecture."""
    try:  # the optional `gguf` extra, asked for only by this verb
        import accelerate  # noqa: F401  (transformers' GGUF loading needs it)
        from gguf import GGUFReader
    except ImportError as exc:
        need = "import-teacher needs gguf and accelerate: pip install 'kdcache[gguf]'"
        raise PipelineError(f"{need} ({exc})") from exc
    if not path.is_file():
        raise PipelineError(f"{path}: no such GGUF file (field 'gguf')")
    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # a parser of untrusted bytes: any failure means a bad file
        raise PipelineError(f"{path}: not a readable GGUF file, truncated or corrupt ({exc})") from exc
    size = path.stat().st_size
    if end > size:
        raise PipelineError(f"{path}: truncated GGUF file ({size:,} bytes; its tensors need {end:,})")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise PipelineError(f"{path}: field 'general.architecture' is {arch!r}; supported: {supported}")
    kinds = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": arch, "tensors": len(reader.tensors), "tensor_types": "/".join(kinds)}


def load_gguf(path: Path, *, quiet: bool = True) -> tuple[Any, Any]:
    """(model, tokenizer) as transformers loads them from the GGUF file, float32, eval mode."""
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError, NotImplementedError) as exc:
        raise PipelineError(f"{path}: transformers cannot load this GGUF file ({exc})") from exc
    if model.config.model_type not in SUPPORTED_ARCHITECTURES:
        raise PipelineError(f"{path}: transformers reads it as {model.config.model_type!r}, not Llama")
    return model.eval(), tokenizer


def save_plain(model: Any, tokenizer: Any, out: Path) -> None:
    """Save GGUF-loaded weights as a plain (unquantised) model directory."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config = type(model.config).from_dict(config)
    with torch.device("meta"):
        plain = type(model)(config)
    # assign=True: the meta tensors become the loaded ones, no second float32 copy.
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()  # lm_head shares embed_tokens again when the GGUF had no output.weight
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o644)  # transformers writes them owner-only, unlike the other files
    save_tokenizer(tokenizer, out, config.max_position_embeddings)


def save_tokenizer(tokenizer: Any, out: Path, max_length: int) -> None:
    """The GGUF file's tokenizer as tokenizer.json, tokenizer_config.json (its bos, eos and
    pad tokens) and chat_template.jinja (the GGUF's `tokenizer.chat_template`, when it has
    one), so `apply_chat_template` and `kdcache prepare --format chat` work on `out`. The
    config names the fast tokenizer class every transformers version knows and drops
    load-time fields."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    doc = json.loads(path.read_text())
    for key in ("is_local", "local_files_only", "backend"):
        doc.pop(key, None)
    doc["tokenizer_class"] = "PreTrainedTokenizerFast"
    doc["model_max_length"] = int(max_length)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def check_conversion(model: Any, tokenizer: Any, out: Path) -> float:
    """Max |logit difference| between the GGUF model and the directory `out`, on SAMPLE_TEXT.

    Raises when the written tokenizer.json tokenises differently, when tied embeddings
    came back untied, or when logits differ by more than LOGITS_ATOL.
    """
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    written_tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    if written_tok.encode(SAMPLE_TEXT, add_special_tokens=False).ids != ids:
        raise PipelineError(f"{out.name}/tokenizer.json: tokenises the sample text unlike the GGUF tokenizer")
    written = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32,
                                                   trust_remote_code=False, use_safetensors=True).eval()
    tied = written.get_output_embeddings().weight is written.get_input_embeddings().weight
    if tied != bool(model.config.tie_word_embeddings):
        raise PipelineError(f"{out.name}/config.json: tied embeddings did not survive the conversion")
    batch = torch.tensor([ids])
    with torch.inference_mode():
        diff = float((model(input_ids=batch).logits - written(input_ids=batch).logits).abs().max())
    if not diff <= LOGITS_ATOL:
        raise PipelineError(
            f"{out.name}: converted model's logits differ from the GGUF model's by {diff:.3g} "
            f"(tolerance {LOGITS_ATOL})"
        )
    return diff


def _write_provenance(out: Path, src: Path, header: dict[str, Any], diff: float) -> None:
    with open(src, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    record = {"source": src.name, "source_sha256": digest, **header,
              "max_abs_logit_diff": diff, "transformers": version("transformers"),
              "gguf": version("gguf")}
    (out / "gguf_import.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def _result(model: Any, tokenizer: Any, out: Path, diff: float, seconds: float) -> ImportResult:
    cfg = model.config
    inp = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # a tied matrix counts once
    embedding = inp.numel() + (0 if head is inp else head.numel())
    return ImportResult(
        out=out, architecture=cfg.model_type, layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.vocab_size, tokenizer_vocab_size=len(tokenizer),
        tied_embeddings=head is inp, params=total, nonembedding_params=total - embedding,
        max_abs_diff=diff, fingerprint=weights_fingerprint(out), seconds=seconds,
    )


class _Stages:
    """One line per slow stage on stderr, with the seconds since the start."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet, self.t0 = quiet, time.perf_counter()

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"import-teacher [{time.perf_counter() - self.t0:5.1f}s] {message}", file=sys.stderr,
                  flush=True)
