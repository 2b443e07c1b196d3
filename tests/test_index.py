import numpy as np
import pytest

from models.data.index import Video, build_index, labels_for, parse_labels_csv, parse_m_file, resolve_root
from models.errors import PipelineError


def test_m_file_several_ranges_and_whitespace(tmp_path):
    path = tmp_path / "UCSDped1.m"
    path.write_text(
        "TestVideoFile = {};\n"
        "TestVideoFile{end+1}.gt_frame = [61:180];\n"
        "TestVideoFile{end+1}.gt_frame = [ 1:52 ,  65:115 ];\n"
        "TestVideoFile{end+1}.gt_frame=[5 7:9];\n"
    )
    assert parse_m_file(path) == [[(61, 180)], [(1, 52), (65, 115)], [(5, 5), (7, 9)]]


def test_m_file_errors_name_the_file(tmp_path):
    empty = tmp_path / "a.m"
    empty.write_text("nothing here\n")
    with pytest.raises(PipelineError, match="a.m"):
        parse_m_file(empty)
    bad = tmp_path / "b.m"
    bad.write_text("TestVideoFile{end+1}.gt_frame = [9:3];\n")
    with pytest.raises(PipelineError, match="9:3"):
        parse_m_file(bad)


def test_labels_land_on_exact_frames_one_based_inclusive():
    video = Video("Test001", "test", path=None, ranges=[(2, 3), (6, 6)])
    assert labels_for(video, 7).tolist() == [0, 1, 1, 0, 0, 1, 0]


def test_range_past_the_end_is_an_error():
    with pytest.raises(PipelineError, match="Test009.*past its last frame \\(5\\)"):
        labels_for(Video("Test009", "test", path=None, ranges=[(3, 6)]), 5)


def test_labels_csv(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("video,start_frame,end_frame\ncam_a,3,5\ncam_a,8,9\ncam_b,1,1\n")
    assert parse_labels_csv(path) == {"cam_a": [(3, 5), (8, 9)], "cam_b": [(1, 1)]}
    path.write_text("video,start\ncam_a,3\n")
    with pytest.raises(PipelineError, match="end_frame"):
        parse_labels_csv(path)


def test_index_of_synthetic_tree(synthetic_root):
    videos = build_index(synthetic_root)
    train = [v for v in videos if v.split == "train"]
    test = [v for v in videos if v.split == "test"]
    assert [v.name for v in train] == ["Train001", "Train002", "Train003"]
    assert [v.name for v in test] == ["Test001", "Test002", "Test003", "Test004"]
    assert all(v.ranges for v in test) and all(len(v.mask_frames) == 24 for v in test)
    assert all(len(v.frames) == 24 for v in videos)


def test_missing_dataset_says_where_to_get_it(tmp_path):
    with pytest.raises(PipelineError, match="svcl.ucsd.edu") as err:
        resolve_root(tmp_path, "UCSDped2")
    assert "Train/Train001/001.tif" in str(err.value)


def test_label_count_mismatch(synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(synthetic_root, root)
    shutil.rmtree(root / "Test" / "Test004")
    with pytest.raises(PipelineError, match="4 entries but .* 3 test videos"):
        build_index(root)


def test_empty_video_folder(tmp_path):
    (tmp_path / "Train" / "Train001").mkdir(parents=True)
    with pytest.raises(PipelineError, match="Train001 has no frames"):
        build_index(tmp_path)


def test_synthetic_labels_match_masks(synthetic_root):
    from PIL import Image

    for video in build_index(synthetic_root):
        if video.split != "test":
            continue
        y = labels_for(video, len(video.frames))
        has_mask = np.array([np.asarray(Image.open(p)).max() > 0 for p in video.mask_frames])
        assert (y == has_mask).all(), video.name
        assert 0 < y.sum() < len(y)


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # indexing reads names only


def test_frames_are_in_natural_order_and_hidden_files_skipped(tmp_path):
    video = tmp_path / "Train" / "walk"
    _touch(video, *(f"{i}.jpg" for i in range(1, 20)), "._1.jpg", ".DS_Store")
    _touch(tmp_path / "Train" / "cam", *(f"cam2_f{i}.png" for i in (10, 9, 1)))
    _touch(tmp_path / "Test" / "Test1", *(f"frame_{i:04d}.png" for i in (0, 2, 10, 1)))
    _touch(tmp_path / "Test" / "Test1_gt", *(f"{i}.bmp" for i in (10, 2, 1, 0)), "._0.bmp")
    videos = {v.name: v for v in build_index(tmp_path)}
    assert [p.name for p in videos["walk"].frames] == [f"{i}.jpg" for i in range(1, 20)]
    assert [p.name for p in videos["cam"].frames] == ["cam2_f1.png", "cam2_f9.png", "cam2_f10.png"]
    assert [p.stem for p in videos["Test1"].frames] == ["frame_0000", "frame_0001", "frame_0002", "frame_0010"]
    assert [p.name for p in videos["Test1"].mask_frames] == ["0.bmp", "1.bmp", "2.bmp", "10.bmp"]


def test_what_a_frame_folder_holds_besides_frames_is_named(tmp_path, caplog):
    """Thumbs.db or a note among the frames is skipped with a warning naming it; hidden files silently."""
    _touch(tmp_path / "Train" / "walk", "1.jpg", "2.jpg", "Thumbs.db", "notes.txt", ".DS_Store")
    _touch(tmp_path / "Test" / "Test1", "1.png")
    with caplog.at_level("WARNING"):
        videos = {v.name: v for v in build_index(tmp_path)}
    assert [p.name for p in videos["walk"].frames] == ["1.jpg", "2.jpg"]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipped 2 entries of frame folder {tmp_path / 'Train' / 'walk'} that are not frames "
        "(.tif, .tiff, .jpg, .jpeg, .png, .bmp): Thumbs.db, notes.txt"
    ]


def test_videos_in_natural_order_and_hidden_video_files_skipped(tmp_path):
    for name in ("cam10", "cam2", "cam1"):
        _touch(tmp_path / "Test" / name, "1.png")
    _touch(tmp_path / "Train" / "a", "1.png")
    _touch(tmp_path / "Train", "._b.mp4")
    (tmp_path / "Test" / "labels.m").write_text("gt_frame = [1];\n" * 3)
    (tmp_path / "Test" / "._labels.m").write_bytes(b"\x00\x05")  # macOS metadata beside it
    videos = build_index(tmp_path)
    assert [v.name for v in videos] == ["a", "cam1", "cam2", "cam10"]


def test_m_file_comments_are_ignored(tmp_path):
    path = tmp_path / "UCSDped2.m"
    path.write_text(
        "% ground truth of the test videos\n"
        "TestVideoFile = {};\n"
        "%TestVideoFile{end+1}.gt_frame = [1:2];\n"
        "TestVideoFile{end+1}.gt_frame = [61:180];  % the cart\n"
        "%{\n"
        "TestVideoFile{end+1}.gt_frame = [3:4];\n"
        "%}\n"
        "TestVideoFile{end+1}.gt_frame = [1:52, ...\n"
        "    65:115];\n"
    )
    assert parse_m_file(path) == [[(61, 180)], [(1, 52), (65, 115)]]


def test_labels_csv_with_bom_spaces_and_blank_lines(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("video, start_frame ,end_frame\r\n\r\ncam_a,3,5\r\n,,\r\n\r\ncam_b,1,1\r\n".encode("utf-8-sig"))
    assert parse_labels_csv(path) == {"cam_a": [(3, 5)], "cam_b": [(1, 1)]}
