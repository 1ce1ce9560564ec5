"""A Q8_0 or BF16 GGUF of a model, made from the GGUF at hand with llama.cpp's own quantize API.

On a few CPU cores a Q4_K target is compute-bound (de-quantizing makes every verified row
cost most of a step), while on Q8_0 and BF16 verifying 2 tokens costs about what 1 does:
there speculation pays (docs/performance.md). The registry carries Q4_K_M files only, so
this re-quantizes one (llama.cpp's ``allow_requantize``): the result has Q8_0's or BF16's
speed and the source's weights, no better. It says so in its metadata (SOURCE_KEY, read
back by ``requantized_from``) and the target worker's log and handshake show it.

    dovetail-launch quantize --target qwen2.5-coder-1.5b-instruct --to q8_0
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("dovetail")

SOURCE_KEY = "dovetail.requantized_from"  # "Q4_K_M (qwen2.5-coder-1.5b-instruct-q4_k_m.gguf)"
SOURCE_ID_KEY = "dovetail.requantized_source_id"  # source_id() of the file it was made from
KINDS = ("q8_0", "bf16", "f16")


def requantize(src: str | os.PathLike, to: str, out: str | os.PathLike | None = None,
               threads: int | None = None) -> Path:
    """``src`` re-quantized to ``to`` (one of KINDS) at ``out`` (default: next to the
    registry's models, ``<cache>/models/<src stem>-<source id>-as-<to>.gguf``); an ``out``
    that an earlier run finished from this same source is returned as it is."""
    to = to.lower()
    if to not in KINDS:
        raise ValueError(f"--to must be one of {', '.join(KINDS)}, got {to!r}")
    src = Path(src)
    if not str(src).endswith(".gguf") or not src.is_file():
        raise ValueError(f"re-quantizing needs a .gguf file, got {src}")
    out = Path(out) if out is not None else default_out(src, to)
    made_from, made_from_id = _labels(out) if out.is_file() else (None, None)  # parsing a GGUF takes seconds: once
    if made_from is not None and made_from_id == source_id(src):
        log.info("%s is there already (re-quantized from %s)", out, made_from)
        return out
    if made_from is not None:
        log.info("%s was re-quantized from another file (%s): making it again from %s", out, made_from, src)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantized = out.with_name(out.name + ".quantizing")
    labelled = out.with_name(out.name + ".labelling")
    source = f"{file_type(src)} ({src.name})"
    try:
        _quantize(src, quantized, to, threads or len(os.sched_getaffinity(0)))
        _label(quantized, labelled, source, source_id(src))
        os.replace(labelled, out)
    finally:
        quantized.unlink(missing_ok=True)
        labelled.unlink(missing_ok=True)
    log.info("wrote %s: %s re-quantized from %s; it has %s's speed and the source's weights", out, to.upper(),
             source, to.upper())
    return out


def default_out(src: Path, to: str) -> Path:
    """Where ``src`` re-quantized to ``to`` goes by default: named by the source's identity,
    not its file name alone, which two different models may share (model-Q4_K_M.gguf)."""
    from dovetail.models.store import default_cache_dir
    return default_cache_dir() / "models" / f"{src.name[:-len('.gguf')]}-{source_id(src)}-as-{to}.gguf"


def source_id(src: Path) -> str:
    """What tells one source file from another: its resolved path, size and modification time
    (as the de-quantized copies in loading.converted_dir are keyed; hashing a GB of weights
    would take longer than re-quantizing them). A file replaced in place gets a new id."""
    st = src.stat()
    key = f"{src.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def file_type(path: str | os.PathLike) -> str:
    """The GGUF's quantization as llama.cpp names it (Q4_K_M, Q8_0, BF16, ...)."""
    import gguf
    field = gguf.GGUFReader(str(path)).get_field("general.file_type")
    if field is None:
        return "unknown"
    try:
        return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file type {int(field.contents())}"


def requantized_from(path: str | os.PathLike) -> str | None:
    """What a file made by requantize() was made from; None for any other GGUF."""
    return _labels(path)[0]


def _labels(path: str | os.PathLike) -> tuple[str | None, str | None]:
    """(SOURCE_KEY, SOURCE_ID_KEY) of a GGUF, None where it has none; one parse of the file."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    fields = (reader.get_field(key) for key in (SOURCE_KEY, SOURCE_ID_KEY))
    return tuple(None if f is None else str(f.contents()) for f in fields)


def _quantize(src: Path, dst: Path, to: str, threads: int) -> None:
    from dovetail.models.options import import_llama
    lib = import_llama().llama_cpp
    lib.llama_backend_init()
    params = lib.llama_model_quantize_default_params()
    params.ftype = {"q8_0": lib.LLAMA_FTYPE_MOSTLY_Q8_0, "bf16": lib.LLAMA_FTYPE_MOSTLY_BF16,
                    "f16": lib.LLAMA_FTYPE_MOSTLY_F16}[to]
    params.allow_requantize = True  # the source is quantized already: its weights are what they are
    params.nthread = threads
    if lib.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not re-quantize {src} to {to.upper()}")


def _label(src: Path, dst: Path, source: str, src_id: str) -> None:
    """Copy ``src`` to ``dst`` with SOURCE_KEY and SOURCE_ID_KEY added (gguf's own metadata copier)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(str(src))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    labels = {SOURCE_KEY: MetadataDetails(gguf.GGUFValueType.STRING, source),
              SOURCE_ID_KEY: MetadataDetails(gguf.GGUFValueType.STRING, src_id)}
    copy_with_new_metadata(reader, writer, labels, [])


def main(argv, default_target: str) -> int:
    p = argparse.ArgumentParser(
        prog="dovetail-launch quantize",
        description="Write a Q8_0, BF16 or F16 GGUF of a model with llama.cpp's quantize API (re-quantizing "
                    "a quantized file: the result has the new type's speed and the source's weights, and says "
                    "where it came from in its metadata). Prints the new file's path; pass it as --target.")
    p.add_argument("--target", default=default_target,
                   help=f"the GGUF to start from: a path, registry name or Hub id (default: {default_target})")
    p.add_argument("--to", required=True, choices=KINDS, help="the quantization to write")
    p.add_argument("--out", default=None, help="where to write it (default: the dovetail cache's models folder)")
    p.add_argument("--threads", type=int, default=None, help="threads to quantize with (default: every allowed CPU)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from dovetail.models.fetch import FetchError, resolve_model
    try:
        print(requantize(resolve_model(args.target), args.to, args.out, args.threads))
    except (FetchError, ValueError, RuntimeError, OSError) as e:
        print(f"dovetail-launch quantize: {e}", file=sys.stderr)
        return 1
    return 0
