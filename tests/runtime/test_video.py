"""Video frames from a folder: natural name order, uniform thinning (runtime/preprocess/video.py)."""

from __future__ import annotations

import pytest
from PIL import Image

from minicpmo.runtime.errors import InputError
from minicpmo.runtime.preprocess.video import load_frame_dir, natural_key, uniform_sample


def test_frames_load_in_natural_order(tmp_path):
    names = ["frame_10.png", "frame_2.png", "frame_1.png", "frame_9.png", "notes.txt"]
    for name in names[:-1]:
        number = int(name.split("_")[1].split(".")[0])
        Image.new("RGB", (4, 4), (number * 20, 0, 0)).save(tmp_path / name)
    (tmp_path / names[-1]).write_text("not a frame")
    frames = load_frame_dir(tmp_path)
    assert [f.getpixel((0, 0))[0] // 20 for f in frames] == [1, 2, 9, 10]
    assert sorted(["b10", "b9", "a100", "B2"], key=natural_key) == ["a100", "B2", "b9", "b10"]


def test_uniform_sample_and_empty_folder(tmp_path):
    assert uniform_sample(list(range(10)), 5) == [1, 3, 5, 7, 9]
    assert uniform_sample([1, 2], 5) == [1, 2]
    with pytest.raises(InputError, match="holds no image files"):
        load_frame_dir(tmp_path)
