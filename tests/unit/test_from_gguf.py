"""``swarm from-gguf`` refuses bad input in one line (the conversion itself runs in
tests/integration/test_real_model.py, which makes its base with it)."""

from __future__ import annotations

import pytest

from swarm.cli import main


def run(capsys, *argv):
    status = main(["from-gguf", *map(str, argv)])
    return status, capsys.readouterr().err


def test_a_missing_file_is_named(tmp_path, capsys):
    status, err = run(capsys, tmp_path / "none.gguf", tmp_path / "out")
    assert status == 2 and err == f"error: {tmp_path / 'none.gguf'}: no such file; give the path of a .gguf file\n"


def test_a_file_that_is_not_gguf_is_refused(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    status, err = run(capsys, fake, tmp_path / "out")
    assert status == 2 and "is not a GGUF file" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_kept(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    status, err = run(capsys, tmp_path / "model.gguf", tmp_path / "out")
    assert status == 2 and "exists; name a new folder" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("dtype", ["int8"])
def test_an_unknown_dtype_is_refused_by_the_parser(tmp_path, capsys, dtype):
    with pytest.raises(SystemExit) as exit_info:
        main(["from-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "out"), "--dtype", dtype])
    assert exit_info.value.code == 2
