"""The README's main job, shortened: train briefly, export, parity of the portable ONNX."""
import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cm_deploy.demo", "--out", str(tmp_path), "--steps", "8",
                        "--baseline-steps", "0"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "ckpt.pt").is_file()
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.onnx", "model.portable.onnx", "manifest.json"}
    # every file the README says the demo writes (under demo_out/) is there
    said = re.search(r"The demo writes `demo_out/`:(.*?`parity\.json`)", README.read_text(), re.S)
    assert said, "README.md no longer lists what the demo writes"
    named = re.findall(r"`([^`]+)`", said.group(1))
    assert "ckpt.pt" in named and [n for n in named if not (tmp_path / n).is_file()] == []
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["ok"] and len(report["cases"]) >= 2
    # the portable file is checked on its own function (the ONNX Scan), never through the op library
    assert report["model"].endswith(",function]:model.portable.onnx"), report["model"]
    if "model_onnx" in report:
        assert report["model_onnx"]["model"].endswith(",custom op]:model.onnx")
