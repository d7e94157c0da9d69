"""The step-time benchmark runs (tiny sizes; its numbers come from an idle machine)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


def test_step_time_smoke(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("step_time", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "result.json"
    assert module.main(["--smoke", "--modes", "bf16-mixed", "fp8-tensorwise",
                        "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["median_s_per_step"]) == {"bf16-mixed", "fp8-tensorwise"}
    assert result["ratio_to_bf16_mixed"]["bf16-mixed"] == 1.0
    assert all(len(v) == 1 and v[0] > 0 for v in result["all_s_per_step"].values())
    assert "fp8-tensorwise" in capsys.readouterr().out
