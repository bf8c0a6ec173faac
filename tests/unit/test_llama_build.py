"""swarm.export.llama_build: telling the portable llama.cpp build from one made for a single CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from swarm.export import llama_build
from swarm.export.llama_build import PORTABLE_CMAKE_ARGS, install_command, judge, parse_cmake_config, parse_system_info

REPO = Path(__file__).resolve().parents[2]

# llama_print_system_info() of llama-cpp-python 0.3.36 as built on this 2-core AMD EPYC (2026-12-07):
# CMAKE_ARGS="-DGGML_NATIVE=OFF", and pip's own build (-march=native).
PORTABLE_INFO = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
NATIVE_EPYC_INFO = (
    "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | AVX512 = 1 | "
    "AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
)
# A native build on an Intel Xeon with AMX adds AMX_INT8 (ggml-cpu.cpp's feature list).
NATIVE_AMX_INFO = NATIVE_EPYC_INFO.replace("LLAMAFILE", "AMX_INT8 = 1 | LLAMAFILE")
PORTABLE_OPTIONS = {"GGML_NATIVE": "OFF", "GGML_AVX2": "ON", "GGML_AVX512": "OFF", "GGML_AMX_TILE": "OFF"}
# pip's native build: -march=native, each instruction-set switch left off.
NATIVE_OPTIONS = {"GGML_NATIVE": "ON", "GGML_AVX2": "OFF", "GGML_AVX512": "OFF", "GGML_AMX_TILE": "OFF"}


def test_system_info_is_read_per_backend():
    assert parse_system_info(PORTABLE_INFO) == {"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2", "LLAMAFILE",
                                                "OPENMP", "REPACK"}
    assert "AMX_INT8" in parse_system_info(NATIVE_AMX_INFO)
    # Another backend's features are not the CPU's; a switch reported as 0 is not compiled in.
    two = "CPU : AVX2 = 1 | AVX512 = 0 | Metal : EMBED_LIBRARY = 1 | "
    assert parse_system_info(two) == {"AVX2"}


def test_cmake_config_options_are_read():
    text = 'set(GGML_ACCELERATE "ON")\nset(GGML_NATIVE "OFF")\n    set(GGML_AVX512 "ON")\nset(OTHER "x")\n'
    assert parse_cmake_config(text) == {"GGML_ACCELERATE": "ON", "GGML_NATIVE": "OFF", "GGML_AVX512": "ON"}


def test_the_portable_build_is_portable():
    verdict = judge(parse_system_info(PORTABLE_INFO), PORTABLE_OPTIONS)
    assert verdict.portable
    assert verdict.reason == "portable (GGML_NATIVE=OFF, x86 features compiled in: AVX AVX2 BMI2 F16C FMA SSE3 SSSE3)"


@pytest.mark.parametrize("info", [NATIVE_EPYC_INFO, NATIVE_AMX_INFO, PORTABLE_INFO], ids=["epyc", "amx", "avx2-cpu"])
def test_a_native_build_is_not_portable_on_any_cpu(info):
    # On an AVX2-only CPU a native build reports the baseline, but -march=native used more than ggml reports.
    verdict = judge(parse_system_info(info), NATIVE_OPTIONS)
    assert not verdict.portable and verdict.reason.startswith("built for the CPU that built it (-march=native;")


def test_extensions_switched_on_by_hand_are_not_portable():
    # DESIGN.md's workaround on the AMX machine: GGML_NATIVE=OFF with AVX-512 on: runs there, not on most desktops.
    options = {**PORTABLE_OPTIONS, "GGML_AVX512": "ON", "GGML_AVX512_VNNI": "ON", "GGML_AVX512_BF16": "ON"}
    verdict = judge(parse_system_info(NATIVE_EPYC_INFO), options)
    assert not verdict.portable
    assert verdict.reason.startswith("built with AVX512, AVX512_BF16, AVX512_VBMI, AVX512_VNNI, which many CPUs lack")
    # Either signal alone is enough.
    assert not judge(parse_system_info(PORTABLE_INFO), {**PORTABLE_OPTIONS, "GGML_AMX_INT8": "ON"}).portable
    assert not judge(parse_system_info(NATIVE_AMX_INFO), PORTABLE_OPTIONS).portable


def test_without_the_native_record_the_target_is_unknown():
    assert not judge(parse_system_info(PORTABLE_INFO), None).portable
    assert "no GGML_NATIVE record" in judge(parse_system_info(PORTABLE_INFO), {}).reason
    assert not judge(None, None).portable
    assert judge(None, PORTABLE_OPTIONS).portable  # the record alone: off, and no extension switched on


def test_the_installed_build_is_judged_from_both_signals(capsys):
    pytest.importorskip("llama_cpp", reason="needs the gguf extra")
    options = llama_build.installed_options()
    features, how = llama_build.installed_features()
    assert how == "ok" and options is not None and "GGML_NATIVE" in options
    # The two signals agree about the instruction sets: a switch on means a feature compiled in.
    if options["GGML_NATIVE"] == "OFF":
        for name in ("AVX512", "AVX512_VNNI", "AVX512_BF16"):
            assert (options[f"GGML_{name}"] == "ON") == (name in features), name
    verdict = llama_build.check()
    code = llama_build.main()
    line = capsys.readouterr().out.strip()
    assert code == (0 if verdict.portable else 1) and verdict.reason in line


def test_a_build_that_dies_loading_is_reported_with_its_signal(monkeypatch):
    pytest.importorskip("llama_cpp", reason="needs the gguf extra")
    # What a build for another CPU does on import: a signal (SIGILL there; a real SIGSEGV here).
    monkeypatch.setattr(llama_build, "_SYSTEM_INFO", "import ctypes; ctypes.string_at(0)")
    verdict = llama_build.check()
    assert not verdict.portable and verdict.reason == "loading llama.cpp died with SIGSEGV: built for another CPU"


def test_not_installed_is_one_line_with_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(llama_build, "installed_version", lambda: None)
    assert llama_build.main() == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: llama-cpp-python is not installed; install the portable build with: {install_command()}"


def test_every_install_line_asks_for_the_portable_build_without_the_cache():
    command = install_command()
    assert command == """CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir 'swarm-train[gguf]'"""
    assert install_command("llama-cpp-python==0.3.36", force=True).endswith("--no-cache-dir --force-reinstall --no-deps llama-cpp-python==0.3.36")
    from swarm.export.llama_cpp import INSTALL_HINT

    assert command in INSTALL_HINT
    readme = (REPO / "README.md").read_text()
    assert f"""CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --no-cache-dir -e '.[gguf]'""" in readme
    assert command in (REPO / "docs" / "export.md").read_text()


def test_run_sh_checks_the_build_and_rebuilds_it_without_the_cache():
    script = (REPO / "tests" / "run.sh").read_text()
    assert re.search(r'^portable="(.*)"', script, re.M).group(1) == PORTABLE_CMAKE_ARGS
    check = script.index("if ! python -m swarm.export.llama_build; then")
    assert script.index('-e ".[test,gguf,trackers]"') < check  # after the install
    rebuild = script[check:script.index("\nfi\n", check)]
    assert '"${CMAKE_ARGS:-} $portable"' in rebuild  # portable even when the caller set CMAKE_ARGS
    assert "--no-cache-dir --force-reinstall --no-deps" in rebuild and '"llama-cpp-python==$version"' in rebuild
    assert rebuild.rstrip().endswith("python -m swarm.export.llama_build  # must say portable now; set -e stops here otherwise")
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script


def test_export_help_gives_the_portable_install_line(capsys):
    from swarm.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    # argparse wraps lines at spaces and hyphens: compare without the whitespace.
    assert install_command().replace(" ", "") in "".join(capsys.readouterr().out.split())


def test_the_gguf_model_card_installs_llama_cpp_python_portable():
    from swarm.export.gguf import GgufFile
    from swarm.export.gguf_card import running_section

    text = running_section([GgufFile(Path("out/m-Q4_K_M.gguf"), "q4_k_m", 1000, 0.1, False)], "org/base", True)
    assert """`Llama(model_path="m-Q4_K_M.gguf")`, installed built for every CPU with """ in text
    assert f"`{install_command('llama-cpp-python')}`" in text
    assert """CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir llama-cpp-python""" in text
