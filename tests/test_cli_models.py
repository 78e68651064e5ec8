"""``selfalign models``: every preset, with its parameter count."""
from __future__ import annotations

import re

import torch

from selfalign.cli import main
from selfalign.models import build_model, count_parameters, preset_names

ROW = re.compile(r"^(\S+)\s+([\d.]+)M\s+(\S+)\s+(\d+)\s+(\S+)$")


def rows(text: str) -> dict[str, tuple]:
    return {m.group(1): m.groups()[1:] for line in text.splitlines() if (m := ROW.match(line.strip()))}


def test_lists_every_preset_with_its_parameter_count(capsys):
    assert main(["models"]) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == set(preset_names())
    for name in ("SiT-XL/2", "DiT-B/4", "SiT-T/2"):
        with torch.device("meta"):
            params = count_parameters(build_model(name))
        assert float(table[name][0]) == round(params / 1e6, 2), name
    assert table["DiT-XL/2"][1] == "675M" and table["SiT-B/2"][1] == "130M"
    assert table["SiT-XL/2"][2] == "256" and table["SiT-XL/2"][3] == "8->20"
    assert table["DiT-XL/2"][3] == "8->16" and table["DiT-B/8"][2] == "16"


def test_filter_and_shape_options(capsys):
    assert main(["models", "--filter", "T/", "--input-size", "8", "--in-channels", "1",
                 "--num-classes", "10"]) == 0
    table = rows(capsys.readouterr().out)
    assert set(table) == {"DiT-T/1", "DiT-T/2", "DiT-T/4", "DiT-T/8",
                          "SiT-T/1", "SiT-T/2", "SiT-T/4", "SiT-T/8"}
    expected = count_parameters(build_model("SiT-T/2", input_size=8, in_channels=1, num_classes=10))
    assert float(table["SiT-T/2"][0]) == round(expected / 1e6, 2)
    assert table["SiT-T/4"][2] == "4"


def test_bad_input_is_one_line_and_exit_code_2(capsys):
    assert main(["models", "--filter", "XL/2", "--input-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("selfalign models: error:") and "--input-size" in err and "\n" not in err


def test_no_matching_preset_is_an_error(capsys):
    assert main(["models", "--filter", "XXL"]) == 2
    assert "no preset matches --filter 'XXL'" in capsys.readouterr().err
    assert main(["models", "--filter", "T/8", "--input-size", "12"]) == 2
    assert main(["models", "--filter", "T/4", "--input-size", "12"]) == 0
