"""``lorakit export``: help, both modes end to end, and errors as one line without a traceback."""

from __future__ import annotations

import pytest

from lorakit import LoraConfig
from lorakit.cli import main
from tests.export.helpers import fields, gguf_reader, save, tiny_base, tiny_peft


@pytest.fixture
def adapter(tmp_path):
    base = tiny_base(tmp_path)
    return save(
        tiny_peft(base, LoraConfig(target_modules=["q_proj", "v_proj"]), scale=0.1), tmp_path / "adapter"
    )


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--gguf", "--merged", "--outtype", "--model", "--force", "ADAPTER_DIR", "OUT.gguf"):
        assert flag in text


def test_adapter_and_merged(adapter, tmp_path, capsys):
    assert main(["export", "--gguf", str(adapter), str(tmp_path / "a.gguf")]) == 0
    assert "LoRA adapter written to" in capsys.readouterr().out
    assert fields(gguf_reader(tmp_path / "a.gguf"))["general.type"] == "adapter"
    assert (
        main(["export", "--gguf", "--merged", "--outtype", "f16", str(adapter), str(tmp_path / "m.gguf")])
        == 0
    )
    assert "merged model written to" in capsys.readouterr().out
    reader = gguf_reader(tmp_path / "m.gguf")
    assert "adapter.type" not in fields(reader)
    assert {t.name: t.tensor_type.name for t in reader.tensors}["blk.1.attn_q.weight"] == "F16"


def test_format_is_required(adapter, tmp_path, capsys):
    assert main(["export", str(adapter), str(tmp_path / "a.gguf")]) == 2
    assert "--gguf" in capsys.readouterr().err


def test_refusal_is_one_line(adapter, tmp_path, capsys):
    (tmp_path / "a.gguf").write_bytes(b"x")
    assert main(["export", "--gguf", str(adapter), str(tmp_path / "a.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit export: error:") and "--force" in err and "Traceback" not in err
    assert main(["export", "--gguf", str(tmp_path / "missing"), str(tmp_path / "b.gguf")]) == 1
    assert "lorakit export: error:" in capsys.readouterr().err
