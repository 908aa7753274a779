"""A bare CUDA image has torch and transformers but no PyAV and no torchdata: the training
path and bench/gpu.py still import there, and only the work that needs a missing package
stops, with an error naming it. Run in a fresh interpreter in which both imports fail."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

WITHOUT_PYAV_AND_TORCHDATA = r"""
import importlib.util, json, sys
import numpy as np
from pathlib import Path
for name in ("av", "torchdata", "torchdata.stateful_dataloader"):
    sys.modules[name] = None  # `import name` now raises ImportError
import vlpretrain.cli, vlpretrain.train.loop
spec = importlib.util.spec_from_file_location("gpu_bench", sys.argv[1] + "/bench/gpu.py")
bench = sys.modules["gpu_bench"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
from vlpretrain.data import loader, media
from vlpretrain.packages import MissingPackageError
errors = {}
try:
    media.load_video_frames(Path(sys.argv[2]), 1, 2, np.random.default_rng(0))
except MissingPackageError as err:
    errors["video"] = str(err)
try:
    loader.stateful_dataloader_class()
except MissingPackageError as err:
    errors["loader"] = str(err)
print(json.dumps(errors))
"""


def test_training_path_imports_without_pyav_and_torchdata(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"not decoded: PyAV is missing before the file is read")
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYAV_AND_TORCHDATA, str(REPO), str(video)],
        capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert f"decoding the video {video} needs the 'av' package" in errors["video"]
    assert "pip install av" in errors["video"]
    assert "data loader needs the 'torchdata' package" in errors["loader"]
    assert "pip install torchdata" in errors["loader"]
