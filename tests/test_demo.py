"""The README's main job, shortened: train briefly, export, parity of the portable ONNX."""
import json
import subprocess
import sys


def test_demo_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cm_deploy.demo", "--out", str(tmp_path), "--steps", "8",
                        "--baseline-steps", "0"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "ckpt.pt").is_file()
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.onnx", "model.portable.onnx", "manifest.json"}
    report = json.loads((tmp_path / "parity.json").read_text())
    assert report["ok"] and len(report["cases"]) >= 2
