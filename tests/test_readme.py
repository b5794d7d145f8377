"""The README's API tour runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_api_tour_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for block in blocks:  # later blocks use what earlier ones made, as a reader would
        exec(compile(block, str(README), "exec"), namespace)
    assert (tmp_path / "qmodel.pt").exists() and (tmp_path / "qmodel.onnx").exists()
