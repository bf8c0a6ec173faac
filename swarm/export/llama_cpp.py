"""llama.cpp's own tools, used as they are: the converters (Python) and the quantizer (C, via bindings).

swarm writes no GGUF itself. ``convert_hf_to_gguf.py`` turns a merged model folder into a
16-bit (or q8_0) GGUF, ``convert_lora_to_gguf.py`` turns a peft adapter into a GGUF LoRA, and
``llama_model_quantize`` (llama.cpp's C API, which the ``llama-cpp-python`` bindings expose)
makes the k-quants from a 16-bit GGUF.

The converters are not in any wheel: they ship in llama.cpp's source tree, which the
``llama-cpp-python`` source distribution carries under ``vendor/llama.cpp``. So they are
found, in this order, in

1. ``--llama-cpp DIR`` or ``$LLAMA_CPP_DIR``: a llama.cpp checkout the user keeps;
2. ``$XDG_CACHE_HOME/swarm/llama.cpp-VERSION`` (default ``~/.cache/swarm/...``), extracted
   once from the source distribution of the installed bindings' VERSION, which pip fetches
   (``python -m swarm.export.llama_cpp`` does it ahead of time). Converter and runtime then
   come from the same llama.cpp commit, so a GGUF written by one loads in the other.

Both tools run in child processes: a failed assertion in llama.cpp aborts the process that
runs it, and swarm must answer with one line instead.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from swarm.errors import UserError
from swarm.export.llama_build import install_command

# The portable build: pip's own build of llama.cpp targets the CPU it runs on (llama_build.py).
INSTALL_HINT = f"install llama.cpp's tools, built for every CPU, with: {install_command()}"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")
# The converter writes these directly; every other type is made by the quantizer from a 16-bit file.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's ``llama_ftype`` values of the types the quantizer makes (include/llama.h).
QUANTIZER_FTYPES = {
    "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
    "q5_k_m": 17, "q6_k": 18, "q4_0": 2, "q5_0": 8,
}
GGUF_TYPES = ("f16", "bf16", "q8_0", *QUANTIZER_FTYPES)


def bindings_version() -> str | None:
    """The installed ``llama-cpp-python`` version, or None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def cache_dir(version: str) -> Path:
    """Where the converters of llama-cpp-python ``version`` are kept once extracted."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "swarm" / f"llama.cpp-{version}"


def find_converter(llama_cpp_dir: str | Path | None = None, fetch: bool = True) -> Path:
    """The llama.cpp folder holding ``convert_hf_to_gguf.py``, ``convert_lora_to_gguf.py`` and ``gguf-py``.

    Args:
        llama_cpp_dir: a llama.cpp checkout; default ``$LLAMA_CPP_DIR``, else the cached copy
            that matches the installed bindings.
        fetch: extract the converters from the bindings' source distribution when not cached.

    Raises:
        UserError: the given folder is no llama.cpp checkout, the bindings are not installed,
            or the source distribution cannot be fetched.
    """
    explicit = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if explicit:
        folder = Path(explicit).expanduser()
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"{folder} is not a llama.cpp checkout (no convert_hf_to_gguf.py); fix --llama-cpp or $LLAMA_CPP_DIR")
        return folder
    version = bindings_version()
    if version is None:
        raise UserError(f"GGUF export needs llama.cpp; {INSTALL_HINT}, or point --llama-cpp at a llama.cpp checkout")
    folder = cache_dir(version)
    if all((folder / part).exists() for part in _CONVERTER_PARTS):
        return folder
    if not fetch:
        raise UserError(f"llama.cpp's converters are not in {folder}; run: python -m swarm.export.llama_cpp")
    return _fetch_converter(version, folder)


def _fetch_converter(version: str, folder: Path) -> Path:
    """Extract the converters from llama-cpp-python's source distribution into ``folder``."""
    print(f"fetching llama.cpp's converters (llama-cpp-python {version} source, once) ...", file=sys.stderr)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={version}", "--dest", tmp],
            capture_output=True, text=True,
        )
        archives = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["pip printed nothing"])[-1]
            raise UserError(
                f"cannot fetch llama-cpp-python {version}'s source for its GGUF converters ({last}); "
                "point --llama-cpp at a llama.cpp checkout instead"
            )
        staging = Path(tmp) / "llama.cpp"
        with tarfile.open(archives[0]) as archive:
            prefix = f"{archives[0].name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)
                       and m.name.removeprefix(prefix).split("/")[0] in _CONVERTER_PARTS]
            for member in members:
                member.name = member.name.removeprefix(prefix)
            # The "data" filter refuses links and paths out of the folder (Python >= 3.10.12, 3.11.4).
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            archive.extractall(staging, members=members, **safe)
        if not all((staging / part).exists() for part in _CONVERTER_PARTS):
            raise UserError(f"llama-cpp-python {version}'s source has no GGUF converters; point --llama-cpp at a llama.cpp checkout")
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # else another export extracted the same files meanwhile
                raise
    return folder


def convert_model(converter: Path, model_dir: Path, outfile: Path, outtype: str, log: Path) -> None:
    """Run ``convert_hf_to_gguf.py`` on a Hugging Face model folder.

    Raises:
        UserError: the converter refused the model (its reason in one line).
    """
    _run([converter / "convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype], log)


def convert_adapter(converter: Path, adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str, log: Path) -> None:
    """Run ``convert_lora_to_gguf.py`` on a peft adapter; ``base_dir`` gives the base's config.

    Raises:
        UserError: the converter refused the adapter (its reason in one line).
    """
    _run([converter / "convert_lora_to_gguf.py", adapter_dir, "--base", base_dir, "--outfile", outfile,
          "--outtype", outtype], log)


def quantize(source: Path, outfile: Path, gguf_type: str, log: Path) -> None:
    """Make a ``gguf_type`` GGUF (a k-quant, q4_0, q5_0) from a 16- or 32-bit GGUF with llama.cpp's quantizer.

    Raises:
        UserError: the bindings are missing, or the quantizer failed.
    """
    if bindings_version() is None:
        raise UserError(f"making {gguf_type} needs llama.cpp's quantizer; {INSTALL_HINT}")
    _run(["-c", _QUANTIZE, source, outfile, str(QUANTIZER_FTYPES[gguf_type])], log, what="llama.cpp's quantizer")


# Runs in a child process: llama.cpp aborts the whole process on an internal error.
_QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = int(sys.argv[3])
params.nthread = 0
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def _run(args: list, log: Path, what: str = "llama.cpp's converter") -> None:
    """Run ``python ARGS`` with its output appended to ``log``; one line of why when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as sink:
        sink.write(f"$ {sys.executable} {' '.join(map(str, args))}\n")
        sink.flush()
        code = subprocess.run([sys.executable, *map(str, args)], stdout=sink, stderr=subprocess.STDOUT).returncode
    if code == 0:
        return
    lines = log.read_text(errors="replace").splitlines()
    raise UserError(f"{what} failed: {explain_failure(lines)}; its full output is in {log}")


def explain_failure(lines: list[str]) -> str:
    """The reason a llama.cpp tool gave, from its output, said so that a user can act on it."""
    text = "\n".join(lines)
    if "BPE pre-tokenizer was not recognized" in text:
        return (
            "it does not know this model's BPE tokenizer (llama.cpp recognises released tokenizers by a hash "
            "of their output; a tokenizer trained for a tiny model is not among them: make tiny models with "
            "`swarm tiny-model --tokenizer sentencepiece`)"
        )
    for line in reversed(lines):
        if "not supported" in line and "Architecture" in line:
            return line.split(":", 1)[-1].strip().rstrip("!") + " by this llama.cpp version"
    errors = [line.strip() for line in lines if line.strip() and not line.startswith("$ ")]
    return errors[-1][:300] if errors else "it printed nothing"


def main() -> int:
    """``python -m swarm.export.llama_cpp``: fetch the converters now (tests/run.sh does this)."""
    try:
        print(find_converter())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
