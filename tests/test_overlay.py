import imageio.v2 as imageio
import numpy as np
import pytest

from models.overlay import Z_FLOOR, overlay_frame, overlay_layout, pixel_auroc, upsample, write_overlay


def frame_region(image, height, width):
    """The picture part of an overlay frame of a (height, width) input."""
    lay = overlay_layout(height, width)
    return image[lay.frame_top : lay.frame_top + lay.frame_height, : lay.frame_width]


def test_upsample_of_a_constant_map_is_constant():
    out = upsample(np.full((3, 4), 2.5, np.float32), (30, 40))
    assert out.shape == (30, 40) and out.dtype == np.float32
    np.testing.assert_allclose(out, 2.5, rtol=1e-6)


def test_upsample_peaks_at_the_cell_centre():
    heat = np.zeros((2, 3, 4), np.float32)
    heat[1, 1, 2] = 1.0
    out = upsample(heat, (15, 20))  # 5x5 pixels per cell: cell (1, 2) is centred on pixel (7, 12)
    assert out.shape == (2, 15, 20)
    assert np.unravel_index(out[1].argmax(), out[1].shape) == (7, 12)
    assert out[1, 7, 12] == pytest.approx(1.0) and out[1, 7, 13] == pytest.approx(0.8)
    assert not out[0].any()
    even = upsample(heat[1], (12, 16))  # 4x4 pixels per cell: centre between pixels 5-6 and 9-10
    assert set(zip(*np.nonzero(even == even.max()), strict=True)) == {(5, 9), (5, 10), (6, 9), (6, 10)}


def test_upsample_leaves_nan_cells_out():
    heat = np.array([[1.0, np.nan], [1.0, 1.0]], np.float32)
    out = upsample(heat, (8, 8))
    np.testing.assert_allclose(out[np.isfinite(out)], 1.0, rtol=1e-6)  # the NaN cell does not spread
    nan = np.isnan(out)
    assert nan[0, 7] and not nan[:, :4].any() and not nan[4:].any()  # NaN only in its own cell's corner
    assert np.isnan(upsample(np.full((2, 2), np.nan), (4, 4))).all()


def test_pixel_auroc_known_answers():
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[:, 2:4, 4:6] = 1  # exactly cell (1, 2) of a 4x4 grid of 2x2-pixel cells
    heat = np.zeros((4, 4, 4), np.float32)
    heat[:, 1, 2] = 5.0
    assert pixel_auroc(upsample(heat, (8, 8)), masks) == 1.0  # the heat at the masks' size
    assert pixel_auroc(heat, masks) == 1.0  # upsampled: still highest inside the mask
    assert pixel_auroc(np.ones((4, 4, 4), np.float32), masks) == 0.5
    assert np.isnan(pixel_auroc(heat, np.zeros_like(masks)))
    assert np.isnan(pixel_auroc(heat, np.ones_like(masks)))


def test_pixel_auroc_skips_unscored_frames_and_subsamples():
    masks = np.zeros((3, 8, 8), np.uint8)
    masks[:, :4] = 1
    heat = np.zeros((3, 2, 2), np.float32)
    heat[:, 0] = 1.0
    heat[0] = np.nan  # no score: left out
    assert pixel_auroc(heat, masks) == 1.0
    heat[2] = heat[2, ::-1]  # one frame ranks its pixels backwards: as many pairs right as wrong
    assert pixel_auroc(heat, masks) == pytest.approx(0.5)
    sub = pixel_auroc(heat, masks, max_pixels=40)  # 20 pixels of each scored frame
    assert sub == pixel_auroc(heat, masks, max_pixels=40)  # reproducible
    assert 0.2 < sub < 0.8
    assert np.isnan(pixel_auroc(np.full((3, 2, 2), np.nan), masks))


def test_overlay_frame_layout_and_upscale():
    frame = np.full((24, 36, 1), 100, np.uint8)
    img = overlay_frame(frame, None, [0.2], 0.5, [0], 1)
    lay = overlay_layout(24, 36)
    assert lay.scale == 14 and lay.frame_width == 36 * 14  # small inputs are upscaled to >= 480 px wide
    assert img.shape == (lay.header_height + 24 * 14 + lay.curve_height, 504, 3)
    assert img.dtype == np.uint8 and img.shape[0] % 2 == 0 and img.shape[1] % 2 == 0
    assert lay.header_height >= 30 and lay.curve_height >= 30
    ped2 = overlay_frame(np.zeros((240, 360), np.uint8), None, [0.2], 0.5, [0], 1)
    assert overlay_layout(240, 360).scale == 2 and ped2.shape[1] == 720
    big = overlay_layout(481, 641)
    assert big.scale == 1 and big.width == 642 and big.height % 2 == 0  # odd sizes padded to even
    assert overlay_frame(np.zeros((481, 641, 3), np.uint8), None, [0.2], 0.5, [0], 1).shape == (big.height, 642, 3)


def test_overlay_frame_tints_only_above_the_floor():
    h, w = 60, 90
    frame = np.full((h, w, 1), 100, np.uint8)
    heat = np.zeros((6, 9), np.float32)
    heat[1, 1] = 6.0  # cell centred on native pixel (15, 15)
    heat[4, 6] = Z_FLOOR  # at the floor: no tint
    img = overlay_frame(frame, heat, [0.2], 0.5, [0], 7)
    pic = frame_region(img, h, w)
    s = overlay_layout(h, w).scale
    grey = pic[40 * s : 60 * s, 30 * s : 90 * s]  # two cells and more away from the hot cell
    assert (grey == 100).all()  # grey stays grey where z is not above the floor
    hot = pic[15 * s, 15 * s].astype(int)
    assert np.abs(hot - 100).max() > 60 and hot[0] != hot[2]  # coloured where z is high
    nan_heat = np.full((6, 9), np.nan, np.float32)
    assert (frame_region(overlay_frame(frame, nan_heat, [np.nan], 0.5, [0], 1), h, w) == 100).all()


def test_overlay_frame_alarm_border_is_red():
    h, w = 60, 90
    frame = np.full((h, w), 100, np.uint8)
    lay = overlay_layout(h, w)
    on = frame_region(overlay_frame(frame, None, [0.2, 0.9], 0.5, [0, 1], 2), h, w)
    off = frame_region(overlay_frame(frame, None, [0.9, 0.2], 0.5, [1, 0], 2), h, w)
    for y, x in [(1, 1), (lay.frame_height // 2, 1), (lay.frame_height - 2, lay.frame_width // 2)]:
        r, g, b = on[y, x].astype(int)
        assert r > 200 and g < 60 and b < 60
        assert (off[y, x] == 100).all()
    assert (on[lay.frame_height // 2, lay.frame_width // 2] == 100).all()


def test_overlay_frame_checks_its_inputs():
    with pytest.raises(ValueError, match="scores and alarms"):
        overlay_frame(np.zeros((8, 8), np.uint8), None, [0.1, 0.2], 0.5, [0], 1)
    with pytest.raises(ValueError, match="frame.shape"):
        overlay_frame(np.zeros((8, 8, 2), np.uint8), None, [0.1], 0.5, [0], 1)
    with pytest.raises(ValueError, match="heat.shape"):
        overlay_frame(np.zeros((8, 8), np.uint8), np.zeros((1, 2, 2)), [0.1], 0.5, [0], 1)


def test_write_overlay_writes_a_readable_mp4(tmp_path):
    n, h, w = 12, 48, 72
    rng = np.random.default_rng(0)
    frames = rng.integers(60, 200, (n, h, w, 1), dtype=np.uint8)
    heat = rng.normal(0, 1, (n, 6, 9)).astype(np.float32)
    heat[0] = np.nan
    scores = np.linspace(0, 1, n)
    scores[0] = np.nan
    path = tmp_path / "out" / "video.mp4"
    write_overlay(path, frames, heat, scores, 0.5, scores > 0.5, fps=5, title="Test001")
    lay = overlay_layout(h, w)
    reader = imageio.get_reader(str(path))
    decoded = np.stack([f for f in reader])  # list(reader) asks len(), which is inf for ffmpeg
    reader.close()
    assert decoded.shape == (n, lay.height, lay.width, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == ["video.mp4"]  # no temporary file left
    # Frames may come from any iterable (e.g. a video reader), with custom numbers.
    write_overlay(path, iter(frames[:3]), None, scores[:3], 0.5, [0, 0, 1], frame_numbers=[10, 11, 12])
    reader = imageio.get_reader(str(path))
    assert reader.count_frames() == 3
    reader.close()


def test_write_overlay_refuses_mismatched_lengths(tmp_path):
    frames = np.zeros((4, 16, 16, 1), np.uint8)
    with pytest.raises(ValueError, match="lengths"):
        write_overlay(tmp_path / "a.mp4", frames, None, np.zeros(3), 0.5, np.zeros(3))
    with pytest.raises(ValueError, match="held 2 frames"):
        write_overlay(tmp_path / "b.mp4", iter(frames[:2]), None, np.zeros(3), 0.5, np.zeros(3))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
