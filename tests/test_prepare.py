import shutil
import subprocess

import h5py
import hickle
import numpy as np
import pytest
from conftest import run_script
from PIL import Image

from models.data.prepare import PrepareConfig, prepare, split_videos
from models.data.store import load, load_labels, load_split, read_metadata
from models.data.synthetic import SyntheticSpec, make_synthetic
from models.errors import PipelineError
from models.shapes import check_frame_size

CONFIG = PrepareConfig(size=(16, 24), n_layers=3, workers=1)


def test_shapes_dtypes_and_metadata(prepared):
    meta = read_metadata(prepared)
    for split in ("train", "val", "test"):
        X, sources = load_split(prepared, split)
        assert X.dtype == np.uint8 and X.shape[1:] == (16, 24, 1)
        assert len(sources) == len(X) == meta["frames"][split]
    assert meta["channels"] == 1 and (meta["height"], meta["width"]) == (16, 24)
    assert meta["frames"]["test"] == 4 * 24 and meta["videos"]["test"]["Test001"] == 24


def test_splits_share_no_video(prepared):
    names = {s: set(load_split(prepared, s)[1]) for s in ("train", "val", "test")}
    assert names["train"] and names["val"] and names["test"]
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert names["train"] | names["val"] == {"Train001", "Train002", "Train003"}


def test_labels_follow_the_m_file(prepared, synthetic_root):
    from models.data.index import parse_m_file

    y = load_labels(prepared)
    _, sources = load_split(prepared, "test")
    for i, ranges in enumerate(parse_m_file(synthetic_root / "Test" / "Synthetic.m"), 1):
        yv = y[sources == f"Test{i:03d}"]
        expected = np.zeros(24, np.uint8)
        for s, e in ranges:
            expected[s - 1 : e] = 1
        assert (yv == expected).all()
    masks = load(prepared / "masks_test.hkl")
    assert masks.shape == (96, 16, 24) and ((masks.reshape(96, -1).max(axis=1) > 0) <= (y > 0)).all()


def test_files_load_with_hickle_and_plain_h5py(prepared):
    X = hickle.load(str(prepared / "X_test.hkl"))
    with h5py.File(prepared / "X_test.hkl", "r") as f:
        assert (f["data"][()] == X).all()
    with h5py.File(prepared / "sources_test.hkl", "r") as f:
        assert f["data"][0] == b"Test001"


def test_split_is_seeded_and_by_video():
    names = [f"Train{i:03d}" for i in range(1, 17)]
    train, val = split_videos(names, 0.15, seed=3)
    assert len(val) == 2 and sorted(train + val) == names
    assert split_videos(names, 0.15, seed=3) == (train, val)
    assert split_videos(["a"], 0.5, 0) == (["a"], [])


def test_size_check_suggests_nearby_sizes():
    check_frame_size(152, 232, 4)
    with pytest.raises(PipelineError, match=r"height 150 -> 144 or 152"):
        check_frame_size(150, 232, 4)


def _copy(root, tmp_path):
    dst = tmp_path / "ds"
    shutil.copytree(root, dst)
    return dst


@pytest.mark.parametrize("case", ["corrupt", "sizes", "labels", "past_end"])
def test_bad_input_leaves_no_output(case, synthetic_root, tmp_path):
    root = _copy(synthetic_root, tmp_path)
    frame = root / "Test" / "Test002" / "005.tif"
    if case == "corrupt":
        frame.write_bytes(b"not an image")
        expected = "Cannot read frame .*Test002/005.tif"
    elif case == "sizes":
        Image.new("L", (10, 10)).save(frame)
        expected = "different sizes in video Test002"
    elif case == "labels":
        m = root / "Test" / "Synthetic.m"
        m.write_text(m.read_text() + "TestVideoFile{end+1}.gt_frame = [1:3];\n")
        expected = "5 entries but .* 4 test videos"
    else:
        m = root / "Test" / "Synthetic.m"
        m.write_text("TestVideoFile{end+1}.gt_frame = [1:30];\n" * 4)
        expected = "Test001 runs past its last frame"
    out = tmp_path / "out" / "Synthetic"
    with pytest.raises(PipelineError, match=expected):
        prepare(root, out, CONFIG)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_existing_output_is_kept_without_overwrite(prepared, synthetic_root):
    before = (prepared / "metadata.json").read_text()
    with pytest.raises(PipelineError, match="already exists"):
        prepare(synthetic_root, prepared, CONFIG)
    assert (prepared / "metadata.json").read_text() == before


def test_custom_layout_video_files_and_csv(tmp_path):
    import imageio.v2 as imageio

    rng = np.random.default_rng(0)
    for split, names in (("Train", ["cam_a", "cam_b"]), ("Test", ["cam_c"])):
        (tmp_path / split).mkdir()
        for name in names:
            frames = (rng.random((12, 32, 48, 3)) * 255).astype(np.uint8)
            imageio.mimwrite(tmp_path / split / f"{name}.mp4", frames, fps=10, macro_block_size=16)
    (tmp_path / "Test" / "labels.csv").write_text("video,start_frame,end_frame\ncam_c,4,6\n")
    meta = prepare(tmp_path, tmp_path / "out", PrepareConfig(size=(16, 24), n_layers=3, channels="3", workers=1))
    assert meta["frames"] == {"train": 12, "val": 12, "test": 12}
    y = load_labels(tmp_path / "out")
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    X, _ = load_split(tmp_path / "out", "test")
    assert X.shape == (12, 16, 24, 3)


def test_custom_layout_frame_folders_jpg(tmp_path, caplog):
    for split, name in (("Train", "walk1"), ("Train", "walk2"), ("Test", "walk3")):
        folder = tmp_path / split / name
        folder.mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (48, 32), (i * 10, i * 10, i * 10)).save(folder / f"frame{i:04d}.jpg")
    (tmp_path / "Test" / "labels.csv").write_text("video,start_frame,end_frame\n")
    meta = prepare(tmp_path, tmp_path / "out", PrepareConfig(size=(16, 24), n_layers=3, workers=1))
    assert meta["channels"] == 1  # grey stored as RGB is detected as grey
    assert load_labels(tmp_path / "out").sum() == 0
    # two normal videos: the val one holds half the normal frames, far more than --val_fraction's 15%
    assert "the val videos hold 50% of the normal frames (1 of 2 videos" in caplog.text


def test_synthetic_is_deterministic(tmp_path):
    spec = SyntheticSpec(height=12, width=18, train_videos=1, test_videos=1, frames=6, seed=7)
    a, b = make_synthetic(tmp_path / "a", "S", spec), make_synthetic(tmp_path / "b", "S", spec)
    for f in sorted(a.rglob("*.tif")):
        assert f.read_bytes() == (b / f.relative_to(a)).read_bytes()


def test_cli_end_to_end(tmp_path):
    cmd = [
        "data_preparation.py",
        "--make_synthetic",
        "--raw_data",
        str(tmp_path / "raw"),
        "--preprocessed_data",
        str(tmp_path / "pre"),
        "--dataset",
        "S",
        "--synthetic_size",
        "24x36",
        "--synthetic_train_videos",
        "2",
        "--synthetic_test_videos",
        "1",
        "--synthetic_frames",
        "10",
        "--size",
        "16x24",
        "--n_layers",
        "3",
        "--workers",
        "1",
    ]
    done = run_script(*cmd)
    assert done.returncode == 0, done.stderr
    assert "S: " in done.stdout and (tmp_path / "pre" / "S" / "y_test.hkl").is_file()
    again = run_script(*cmd[:-6], "--size", "15x24", "--n_layers", "3")
    assert again.returncode == 2 and "15x24 does not suit a 3-layer PredNet" in again.stderr


def test_cli_bad_size(tmp_path):
    done = run_script("data_preparation.py", "--raw_data", str(tmp_path), "--size", "150x232")
    assert done.returncode == 2 and "144 or 152" in done.stderr and "Traceback" not in done.stderr


def _grey_video(tmp_path, image):
    from models.data.index import Video

    image.save(tmp_path / "1.tif")
    return Video("v", "train", tmp_path, frames=[tmp_path / "1.tif"])


def test_16_bit_frames_are_scaled_not_clipped(tmp_path):
    from models.data.frames import decode_video

    values = np.array([[0, 128, 257, 257 * 7], [257 * 100, 257 * 254, 65534, 65535]], dtype=np.uint16)
    expected = [[0, 0, 1, 7], [100, 254, 255, 255]]
    little = Image.fromarray(values)  # I;16
    big = Image.new("I;16B", (4, 2))
    big.frombytes(values.astype(">u2").tobytes())
    wide = Image.fromarray(values.astype(np.int32))  # I: 32-bit integers
    for image in (little, big, wide):
        folder = tmp_path / image.mode.replace(";", "_")
        folder.mkdir()
        video = _grey_video(folder, image)
        assert Image.open(video.frames[0]).mode == image.mode
        X, lost = decode_video(video, (2, 4), 1)
        assert lost == 0 and X.dtype == np.uint8 and X[0, ..., 0].tolist() == expected, image.mode


def test_float_frames_in_0_1_are_scaled_by_255(tmp_path):
    from models.data.frames import read_video

    image = Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32))
    X = read_video(_grey_video(tmp_path, image), (1, 4), 1)
    assert X[0, ..., 0].tolist() == [[0, 64, 128, 255]]  # rounded half up: 127.5 -> 128


def _video(path, n=20):  # an encoded video, its container chosen by the suffix
    import imageio.v2 as imageio

    frames = (np.random.default_rng(0).random((n, 32, 48, 3)) * 255).astype(np.uint8)
    imageio.mimwrite(path, frames, fps=10, macro_block_size=16)
    return path


def test_avi_header_gives_the_frame_count_a_truncation_cannot_hide(tmp_path):
    from models.data.frames import avi_frame_count, frames_lost

    path = _video(tmp_path / "v.avi")
    assert avi_frame_count(path) == 20
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 10])
    assert avi_frame_count(path) == 20
    assert frames_lost(19, 20) == 0 and frames_lost(2, 20) == 18  # one frame short is within rounding


def test_a_variable_rate_video_gives_its_frames_as_stored_at_their_average_rate(tmp_path):
    """A 10 frames/s camera that dropped frames 40-70 and 120-140 (a variable-rate file, 128 frames in 18 s):
    its 128 frames, none repeated to fill the gaps, at its average rate, which the frame count matches."""
    import imageio_ffmpeg

    from models.data.frames import decode_video
    from models.data.index import Video
    from models.data.inputs import video_fps

    path = tmp_path / "vfr.mp4"
    keep = "not(between(n,40,70))*not(between(n,120,140))"
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i",
         "testsrc=size=48x32:rate=10:duration=18", "-vf", f"select='{keep}'", "-fps_mode", "vfr", "-c:v", "libx264",
         str(path)],
        check=True,
    )  # fmt: skip
    video, meta = Video("vfr", "test", path), {}
    X, lost = decode_video(video, (16, 24), 1, meta=meta)
    assert len(X) == 180 - 31 - 21 and lost == 0
    assert (np.abs(np.diff(X.astype(int), axis=0)).max(axis=(1, 2, 3)) > 0).all()  # no frame repeated
    assert video_fps(video) == pytest.approx(128 / 18, abs=0.01)
    path.unlink()  # the rate the decoder read, without opening the file again
    assert video_fps(video, meta=meta) == pytest.approx(128 / 18, abs=0.01)


def test_truncated_mkv_is_caught_by_its_duration_times_frame_rate(tmp_path):
    from models.data.frames import decode_video, read_video
    from models.data.index import Video

    path = _video(tmp_path / "v.mkv")  # Matroska states its duration up front
    X, lost = decode_video(Video("v", "train", path), (16, 24), 3)
    assert len(X) == 20 and lost == 0
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PipelineError, match=r"v.mkv is truncated: \d+ frames decoded but its container reports 20"):
        read_video(Video("v", "train", path), (16, 24), 3)
    X, lost = decode_video(Video("v", "train", path), (16, 24), 3, allow_truncated=True)
    assert 0 < len(X) < 20 and len(X) + lost == 20


def test_truncated_video_kept_with_a_warning_when_allowed(tmp_path, caplog):
    (tmp_path / "Train").mkdir()
    _video(tmp_path / "Train" / "whole.avi", 8)
    cut = _video(tmp_path / "Train" / "cut.avi")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 3 // 10])
    config = PrepareConfig(size=(16, 24), n_layers=3, val_fraction=0, workers=1, allow_truncated=True)
    meta = prepare(tmp_path, tmp_path / "out", config)
    kept = meta["videos"]["train"]["cut"]
    assert 0 < kept < 20 and meta["videos"]["train"]["whole"] == 8
    assert meta["truncated_videos"] == {"cut": {"frames_kept": kept, "frames_lost": 20 - kept}}
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]  # alone or after other tests
    assert any(f"{20 - kept} of its 20 frames lost, {kept} kept" in w for w in warnings), warnings
