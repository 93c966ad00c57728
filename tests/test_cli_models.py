"""The model-file commands of the `ternlm` CLI: convert, verify, export/import, list, and MODEL arguments."""

from __future__ import annotations

import numpy as np
import pytest

import ternlm
from ternlm.cli import main
from tiny_models import toy_model_path


def test_convert_to_tlm_verify_and_run(tmp_path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "default.tlm"
    assert main(["convert", str(ternlm.api.default_model_path()), "-o", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    assert "every tensor matches its checksum" in capsys.readouterr().out
    ids = [1, 2, 3, 4]
    np.testing.assert_array_equal(ternlm.load(out).logits(ids), ternlm.load(cache=False).logits(ids))
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside some weight tensor
    out.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "checksum" in capsys.readouterr().out


def test_export_import_round_trip(tmp_path, capsys: pytest.CaptureFixture) -> None:
    archive = tmp_path / "model.tar"
    assert main(["export", str(ternlm.api.default_model_path()), str(archive)]) == 0
    assert main(["import", str(archive), str(tmp_path / "imported")]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1]
    np.testing.assert_array_equal(ternlm.load(path).logits([5, 6]), ternlm.load().logits([5, 6]))


def test_model_argument_that_is_neither_path_nor_cached_repo(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", "nobody/no-such-model"]) == 1
    assert "ternlm pull nobody/no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_convert_to_gguf_and_load_it_back(tmp_path, qtype: str) -> None:
    out = tmp_path / "toy.gguf"
    with pytest.warns(UserWarning):  # the toy model's 640-wide FFN does not fill 256-blocks: F16 rows
        assert main(["convert", str(toy_model_path()), "-o", str(out), "--type", qtype]) == 0
    ids = [1, 2, 3, 4]
    # ternary values and scales come back exactly (`.scale` ratios); float rounding left 9.5e-7 (logits up to ~6)
    np.testing.assert_allclose(ternlm.load(out, head="float", cache=False).logits(ids),
                               ternlm.load(toy_model_path(), head="float", cache=False).logits(ids),
                               rtol=0, atol=1e-5)


def test_convert_to_i2_s_for_bitnet_cpp(tmp_path) -> None:
    """The shipped model as bitnet.cpp's I2_S reads back with the same logits, bit for bit: float32 scales, and
    its float32 embedding kept as F32 (F16, the default, rounds it)."""
    out = tmp_path / "default-i2s.gguf"
    args = ["convert", str(ternlm.api.default_model_path()), "-o", str(out), "--type", "I2_S", "--gguf-head", "F32"]
    assert main(args) == 0
    ids = [5, 6, 7, 8]
    np.testing.assert_array_equal(ternlm.load(out, head="float", cache=False).logits(ids),
                                  ternlm.load(ternlm.api.default_model_path(), head="float", cache=False).logits(ids))


def test_tco_command_prints_json(capsys: pytest.CaptureFixture) -> None:
    import json

    assert main(["tco", "--example", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["schema"] == "ternlm.tco/1"
