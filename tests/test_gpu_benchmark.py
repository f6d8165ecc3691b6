"""benchmarks/gpu.py, the script prepared for a GPU machine, runs end to end on CPU at tiny size and writes
every number it promises (the GPU run must not be its first run)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_on_cpu_at_tiny_size(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_benchmark", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "gpu.json")])
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert "threads" in result["device"] and result["tiny"] and result["compile"] is False and result["failed"] == {}
    what = [row["what"] for row in result["rows"]]
    # the small study's step, both architectures with checkpointing off and on, sampling, Inception, VAE
    assert sum(w.startswith("train dit-tiny") for w in what) == 2 and sum(w.startswith("train improved") for w in what) == 2
    assert any(w.startswith("train small-study") for w in what)
    assert any(w.startswith("sample dit") for w in what) and any(w.startswith("inception") for w in what)
    assert any(w.startswith("vae encode") for w in what)
    assert all(row["images_per_s"] > 0 for row in result["rows"])
    # a FLOP rate below the machine's own measured matmul peak, and MFU on the same scale
    assert 0 < result["cpu"]["fraction_of_peak"] < 1
    assert all(0 < row["mfu"] < 1 for row in result["rows"] if row.get("mfu") is not None)
    assert result["flash_sdpa"]["active"] is None  # a CUDA kernel: not claimed on CPU
    assert "MFU" in capsys.readouterr().out
