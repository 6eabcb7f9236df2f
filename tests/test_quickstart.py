"""The README's quickstart runs offline and prints float vs quantized top-1."""

from __future__ import annotations

import re

from transformers import AutoModelForImageClassification

from hf_ptq.quickstart import main


def test_quickstart_end_to_end(digits_checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "q"
    assert main(["--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    fp = float(re.search(r"float top-1\s+:\s+([\d.]+) %", text).group(1))
    q = float(re.search(r"rtn W4 top-1\s+:\s+([\d.]+) %", text).group(1))
    assert fp > 97 and fp - q <= 3
    import hf_ptq  # noqa: F401  (registers the quantizer)

    reloaded = AutoModelForImageClassification.from_pretrained(out_dir)
    assert reloaded.config.quantization_config.weight_bits == 4
