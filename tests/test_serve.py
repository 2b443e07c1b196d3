"""The web service with a real server and real clients: `python serve.py` on a free localhost port with the
tiny model, httpx posting encoded video and archives, a WebSocket client streaming PNG frames. Scores are
checked against batch_scoring.py --input on the same files, every limit and malformed request against its
4xx, and the service must still be healthy after all of them. Also the exported scoring model."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import socket
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import imageio.v2 as imageio
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, run_script, video_with_longer_audio
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from benchmarks.load_test import start_server, stop_server
from models.errors import PipelineError
from models.streaming import window_position
from models.uploads import Deadline, Limits, UploadError, archive_members, upload_kind

KEY = "test-key-123"
AUTH = {"X-API-Key": KEY}
TIMEOUT_S = 6  # the server's request_timeout_s: a slow upload and an idle stream run into it
MAX_FRAMES = 30
MAX_UPLOAD_MB = 0.25


def _write_mp4(path: Path, frames) -> None:
    with imageio.get_writer(str(path), fps=10, codec="libx264", quality=9, macro_block_size=4) as w:
        for f in frames:
            w.append_data(np.repeat(f, 3, axis=-1))


def _grey(paths) -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("L"))[..., None] for p in paths]


def _png(frame: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tar(members: dict[str, bytes], symlink: str | None = None, mode: str = "w:gz", **kwargs) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, **kwargs) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
    return buf.getvalue()


@pytest.fixture(scope="module")
def media(synthetic_root, tmp_path_factory):
    """Real files: two test videos as .mp4, one as a folder of PNG frames (and a zip and a tar.gz of it),
    and a video longer than the server's max_frames."""
    folder = tmp_path_factory.mktemp("media")
    test = synthetic_root / "Test"
    for name in ("Test001", "Test002"):
        _write_mp4(folder / f"{name}.mp4", _grey(sorted((test / name).glob("*.tif"))))
    cam = folder / "cam3"
    cam.mkdir()
    pngs = {}
    for p in sorted((test / "Test003").glob("*.tif")):
        Image.open(p).save(cam / f"{p.stem}.png")
        pngs[f"cam3/{p.stem}.png"] = (cam / f"{p.stem}.png").read_bytes()
    (folder / "cam3.zip").write_bytes(_zip(pngs))
    (folder / "cam3.tar.gz").write_bytes(_tar(pngs))
    long = _grey(sorted((test / "Test001").glob("*.tif"))) + _grey(sorted((test / "Test002").glob("*.tif")))
    _write_mp4(folder / "long.mp4", long)
    return folder


@pytest.fixture(scope="module")
def batch(trained, media, tmp_path_factory):
    """batch_scoring.py --input on the same files: its df.pkl.gz and alarms.csv."""
    out = tmp_path_factory.mktemp("batch") / "scored"
    done = run_script(
        "batch_scoring.py", "--model_dir", trained, "--input", media / "Test001.mp4", media / "cam3",
        "--scored_data", out, "--overlays", "0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_pickle(out / "df.pkl.gz"), pd.read_csv(out / "alarms.csv")


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """`python serve.py` on a free localhost port, with an API key and small limits; yields its URL, the
    process and the temporary folder it was given (which must hold nothing of it afterwards). Its log must
    show no traceback when the tests are done."""
    tmp = tmp_path_factory.mktemp("server_tmp")
    log_path = tmp_path_factory.mktemp("server_log") / "serve.log"
    args = [
        "--model_dir", trained, "--max_upload_mb", MAX_UPLOAD_MB, "--max_frames", MAX_FRAMES, "--max_streams", 2,
        "--request_timeout_s", TIMEOUT_S, "--log_level", "warning",
    ]  # fmt: skip
    try:
        proc, url = start_server(args, log_path, env={"PREDNET_API_KEY": KEY, "TMPDIR": str(tmp)}, timeout_s=180)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url, proc, tmp
    log = log_path.read_text()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]  # no request reached a 500
    stop_server(proc, 20)


def _scores(frames: list[dict], key: str = "score") -> np.ndarray:
    return np.array([np.nan if f[key] is None else f[key] for f in frames], float)


def _stream(url: str, frames: list[bytes], headers=AUTH) -> list[dict]:
    async def run():
        async with connect(url.replace("http", "ws") + "/v1/stream", additional_headers=headers) as ws:
            out = []
            for data in frames:
                await ws.send(data)
                out.append(json.loads(await ws.recv()))
            return out

    return asyncio.run(run())


def _health_when_streams_closed(url: str) -> dict:
    """/health once the server has seen every stream of a test end (a client's close arrives a moment later)."""
    for _ in range(50):
        health = httpx.get(f"{url}/health").json()
        if health["streams"] == 0:
            return health
        time.sleep(0.1)
    raise AssertionError(f"streams still open: {health}")


def test_health_model_and_docs(server, trained):
    url, _, _ = server
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["max_streams"] == 2
    info = httpx.get(f"{url}/v1/model", headers=AUTH).json()
    assert info["frame_shape"] == {"height": 16, "width": 24, "channels": 1}
    assert info["calibration"]["window"] == 4 and info["calibration"]["per_window"] == 2
    assert info["calibration"]["threshold"] == pytest.approx(2.0) and info["training"]["arguments"]["nt"] == 4
    assert info["limits"]["max_frames"] == MAX_FRAMES and "fastapi" in info["versions"]
    assert str(trained) not in json.dumps(info) and str(ROOT) not in json.dumps(info)  # no server paths
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/v1/score" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_clip_scores_equal_batch_scoring(server, media, batch):
    url, _, _ = server
    df, events = batch
    with open(media / "Test001.mp4", "rb") as f:
        multipart = httpx.post(f"{url}/v1/score", files={"file": ("Test001.mp4", f, "video/mp4")}, headers=AUTH)
    raw = httpx.post(  # ?fps= in place of the file's own rate (a raw camera dump names none)
        f"{url}/v1/score?fps=4",
        content=(media / "Test001.mp4").read_bytes(),
        headers={**AUTH, "Content-Type": "video/mp4"},
    )
    bearer = {"Authorization": f"Bearer {KEY}"}
    zipped = httpx.post(
        f"{url}/v1/score",
        content=(media / "cam3.zip").read_bytes(),
        headers={**bearer, "Content-Type": "application/zip"},
    )
    with open(media / "cam3.tar.gz", "rb") as f:  # ?fps= for an archive, as --fps for a folder of frames
        tarred = httpx.post(f"{url}/v1/score?fps=5", files={"file": ("cam3.tar.gz", f)}, headers=AUTH)
    assert [r.json()["fps"] for r in (multipart, raw, zipped, tarred)] == [10.0, 4.0, 10.0, 5.0]
    for response, video in ((multipart, "Test001"), (raw, "upload"), (zipped, "cam3"), (tarred, "cam3")):
        assert response.status_code == 200, response.text
        body = response.json()
        expected = df[df["video"] == ("Test001" if video == "upload" else video)]
        assert body["video"] == video and body["n_frames"] == len(expected) == 24 and body["frames_lost"] == 0
        assert [f["frame"] for f in body["frames"]] == expected["frame"].tolist()
        np.testing.assert_allclose(_scores(body["frames"]), expected["score"], atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(
            _scores(body["frames"], "copy_score"), expected["copy_score"], atol=1e-6, equal_nan=True
        )
        assert [f["alarm"] for f in body["frames"]] == expected["alarm"].tolist()
        name = expected["video"].iloc[0]
        mine = pd.DataFrame(body["alarms"]).assign(video=name) if body["alarms"] else pd.DataFrame()
        theirs = events[events["video"] == name].reset_index(drop=True)
        assert len(mine) == len(theirs)
        if len(theirs):
            pd.testing.assert_frame_equal(mine[theirs.columns], theirs, check_dtype=False, atol=1e-6)


def test_a_clip_whose_audio_outlasts_its_video_is_scored(server, tmp_path):
    url, _, _ = server
    clip = video_with_longer_audio(tmp_path / "cam.mp4")  # 20 frames, 5 s of sound
    response = httpx.post(f"{url}/v1/score", files={"file": ("cam.mp4", clip.read_bytes(), "video/mp4")}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["n_frames"] == 20 and body["frames_lost"] == 30 and body["fps"] == 10.0
    assert len(body["frames"]) == 20 and body["frames"][1]["score"] is not None


def test_stream_scores_equal_batch(server, media, batch):
    url, _, _ = server
    df, _ = batch
    frames = [p.read_bytes() for p in sorted((media / "cam3").glob("*.png"))]
    expected = df[df["video"] == "cam3"]

    async def two_at_once():  # the frames of concurrent streams share model calls; each keeps its own states
        async def one(data):
            async with connect(url.replace("http", "ws") + "/v1/stream", additional_headers=AUTH) as ws:
                out = []
                for d in data:
                    await ws.send(d)
                    out.append(json.loads(await ws.recv()))
                return out

        return await asyncio.gather(one(frames), one(frames))

    for out in asyncio.run(two_at_once()):
        assert [r["frame"] for r in out] == list(range(1, 25))
        assert out[0]["score"] is None  # nothing precedes the first frame
        np.testing.assert_allclose(_scores(out), expected["score"], atol=1e-4, equal_nan=True)
        np.testing.assert_allclose(_scores(out, "copy_score"), expected["copy_score"], atol=1e-4, equal_nan=True)
        assert [r["alarm"] for r in out] == expected["alarm"].tolist()
    health = _health_when_streams_closed(url)
    assert health["batched_frames"] >= 48 and health["steps_per_frame"] == 2  # 2 streams x 24 frames


def test_window_position_is_window_rows():
    from models.inference import window_rows

    for window, per_window in ((4, 2), (6, 3), (10, 5), (5, 1)):
        starts, _, steps = window_rows(np.array(["v"] * 40), window, per_window)
        for start, row in zip(starts, steps, strict=True):
            for step in row[row >= 0]:
                assert window_position(int(start + step), window, per_window) == (start, step)


def test_upload_kinds_and_archive_paths():
    assert upload_kind("video/mp4", None, b"") == ("video", ".mp4")
    assert upload_kind("application/octet-stream", None, b"PK\x03\x04...") == ("zip", "")
    assert upload_kind(None, "clip.AVI", b"") == ("video", ".avi")
    for compressed in ("w:bz2", "w:xz"):  # a compressed tar sent as octet-stream is a tar, not a video
        assert upload_kind("application/octet-stream", None, _tar({"1.png": b"1"}, mode=compressed)) == ("tar", "")
    with pytest.raises(UploadError) as err:
        upload_kind("text/plain", None, b"hello")
    assert err.value.status == 415
    limits, deadline = Limits(max_frames=3), Deadline(10)
    junk = {"a/notes.txt": b"", "__MACOSX/a/._1.png": b"", "a_gt/1.png": b""}
    members = archive_members(_zip({"a/2.png": b"2", "a/1.png": b"1", **junk}), "zip", limits, deadline)
    assert [n for n, _ in members] == ["a/1.png", "a/2.png"]
    for bad in ({"../x.png": b"1"}, {"/etc/x.png": b"1"}, {"a/../../x.png": b"1"}, {"C:\\x.png": b"1"}):
        with pytest.raises(UploadError, match="leaves the archive"):
            archive_members(_zip(bad), "zip", limits, deadline)
    with pytest.raises(UploadError, match="max_frames"):
        archive_members(_zip({f"{i}.png": b"1" for i in range(4)}), "zip", limits, deadline)
    with pytest.raises(UploadError, match="link"):
        archive_members(_tar({"1.png": b"1"}, symlink="2.png"), "tar", limits, deadline)


def _bad_requests(media: Path) -> list[tuple[str, dict, bytes | None, dict | None, int, str | None]]:
    """(what, headers, body, multipart files, status, limit) of each request the service must refuse."""
    mp4 = (media / "Test001.mp4").read_bytes()
    png = (media / "cam3" / "001.png").read_bytes()
    video = {**AUTH, "Content-Type": "video/mp4"}
    return [
        ("too large", video, os.urandom(int(MAX_UPLOAD_MB * 1024 * 1024) + 1000), None, 413, "max_upload_mb"),
        ("too many frames", video, (media / "long.mp4").read_bytes(), None, 413, "max_frames"),
        ("too many frames in an archive", {**AUTH, "Content-Type": "application/zip"},
         _zip({f"v/{i:03d}.png": png for i in range(MAX_FRAMES + 1)}), None, 413, "max_frames"),
        ("not a video", video, b"this is not a video" * 100, None, 422, None),
        ("truncated video", video, mp4[: len(mp4) // 2], None, 422, None),
        ("empty body", video, b"", None, 422, None),
        ("wrong content type", {**AUTH, "Content-Type": "text/plain"}, b"hello", None, 415, None),
        ("json", {**AUTH, "Content-Type": "application/json"}, b'{"path": "/etc/passwd"}', None, 415, None),
        ("frame that does not decode", {**AUTH, "Content-Type": "application/zip"},
         _zip({"v/001.png": png, "v/002.png": b"\x89PNG broken"}), None, 422, None),
        ("frames of two sizes", {**AUTH, "Content-Type": "application/zip"},
         _zip({"v/001.png": png, "v/002.png": _png(np.zeros((8, 8, 1), np.uint8))}), None, 422, None),
        ("tar of a huge other file", {**AUTH, "Content-Type": "application/x-tar"},
         _tar({"v/notes.txt": bytes(int(MAX_UPLOAD_MB * 1024 * 1024) * 8), "v/001.png": png}, mode="w:bz2"), None,
         413, "max_upload_mb"),  # counted before it is decompressed (a few hundred bytes: a decompression bomb)
        ("tar of a huge long-name header", {**AUTH, "Content-Type": "application/x-tar"},
         _tar({"v/" + "n" * int(MAX_UPLOAD_MB * 1024 * 1024 * 8) + ".png": png}, mode="w:xz",
              format=tarfile.GNU_FORMAT), None, 413, "max_upload_mb"),  # read whole before its member is seen
        ("tar of a huge pax header", {**AUTH, "Content-Type": "application/x-tar"},
         _tar({"v/001.png": png}, mode="w:gz", format=tarfile.PAX_FORMAT,
              pax_headers={"comment": "c" * int(MAX_UPLOAD_MB * 1024 * 1024 * 8)}), None, 413, "max_upload_mb"),
        ("frame over max_pixels in an archive", {**AUTH, "Content-Type": "application/zip"},
         _zip({"v/001.png": _png(np.zeros((4097, 4097, 1), np.uint8))}), None, 413, "max_pixels"),
        ("traversal zip", {**AUTH, "Content-Type": "application/zip"}, _zip({"../../evil.png": png}), None, 422, None),
        ("absolute tar", {**AUTH, "Content-Type": "application/x-tar"}, _tar({"/tmp/evil.png": png}), None, 422, None),
        ("symlink tar", {**AUTH, "Content-Type": "application/gzip"}, _tar({"v/001.png": png}, "v/002.png"), None,
         422, None),
        ("broken zip", {**AUTH, "Content-Type": "application/zip"}, b"PK\x03\x04 broken", None, 422, None),
        ("archive without frames", {**AUTH, "Content-Type": "application/zip"}, _zip({"a.txt": b"x"}), None, 422, None),
        ("multipart without a file", AUTH, None, {"note": (None, "hello")}, 422, None),
        ("multipart of a text file", AUTH, None, {"file": ("notes.txt", b"hello", "text/plain")}, 415, None),
        ("multipart without boundary", {**AUTH, "Content-Type": "multipart/form-data"}, b"xx", None, 422, None),
        ("no key", {"Content-Type": "video/mp4"}, mp4, None, 401, "api_key"),
        ("wrong key", {"X-API-Key": "nope", "Content-Type": "video/mp4"}, mp4, None, 401, "api_key"),
        ("wrong bearer", {"Authorization": "Bearer nope", "Content-Type": "video/mp4"}, mp4, None, 401, "api_key"),
    ]  # fmt: skip


def test_bad_requests_get_4xx_and_the_service_stays_healthy(server, media):
    url, proc, tmp = server
    for what, headers, body, files, status, limit in _bad_requests(media):
        r = httpx.post(f"{url}/v1/score", headers=headers, content=body, files=files, timeout=30)
        assert r.status_code == status, (what, r.status_code, r.text[:300])
        assert r.headers["content-type"] == "application/json" and r.json()["error"], what
        assert r.json()["limit"] == limit, (what, r.json())
        assert str(tmp) not in r.json()["error"], what  # no server path in a message
        if what == "not a video":
            assert r.json()["error"].startswith("Cannot open the uploaded video: "), r.json()
    frames = _zip({f"v/{p.name}": p.read_bytes() for p in sorted((media / "cam3").glob("*.png"))[:3]})
    for query in ("fps=0", "fps=abc", "fps=inf", "fps=1e300", "fps=-5"):  # refused before the clip is read
        r = httpx.post(f"{url}/v1/score?{query}", headers={**AUTH, "Content-Type": "application/zip"}, content=frames)
        assert r.status_code == 422 and r.json()["limit"] is None and "fps" in r.json()["error"], (query, r.text)
    r = httpx.get(f"{url}/v1/score", headers=AUTH)
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed", "limit": None}
    assert httpx.get(f"{url}/v1/model").status_code == 401
    assert httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/health").json()["status"] == "ok" and proc.poll() is None
    assert not any(tmp.iterdir()), list(tmp.iterdir())  # every upload's temporary file is gone


def test_stream_refusals_and_bad_frames(server, media):
    url, proc, _ = server
    ws_url = url.replace("http", "ws") + "/v1/stream"
    pngs = [p.read_bytes() for p in sorted((media / "cam3").glob("*.png"))]

    async def closed_with(headers) -> tuple[dict, int]:
        async with connect(ws_url, additional_headers=headers) as ws:
            message = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed) as err:
                await ws.recv()
            return message, err.value.rcvd.code

    _health_when_streams_closed(url)

    async def run():
        message, code = await closed_with({})
        assert code == 4401 and message["limit"] == "api_key"
        message, code = await closed_with({"X-API-Key": "nope"})
        assert code == 4401
        async with connect(ws_url, additional_headers=AUTH) as a, connect(ws_url, additional_headers=AUTH) as b:
            message, code = await closed_with(AUTH)  # a third stream: over max_streams
            assert code == 1013 and message["limit"] == "max_streams"
            await a.send(pngs[0])
            assert json.loads(await a.recv())["frame"] == 1
            huge = _png(np.zeros((4097, 4097, 1), np.uint8))
            for bad, limit in ((b"not an image", None), (b"", None), (_png(np.zeros((8, 8, 1), np.uint8)), None),
                               (huge, "max_pixels")):  # fmt: skip
                await a.send(bad)  # dropped, the stream goes on
                reply = json.loads(await a.recv())
                assert reply["frame"] is None and reply["error"] and reply["limit"] == limit, reply
            await a.send("a text message")
            assert "binary" in json.loads(await a.recv())["error"]
            await a.send(pngs[1])
            assert json.loads(await a.recv())["frame"] == 2
            await b.send(os.urandom(int(MAX_UPLOAD_MB * 1024 * 1024) + 1000))  # over the message size limit
            with pytest.raises(ConnectionClosed) as err:
                await b.recv()
            assert err.value.rcvd is None or err.value.rcvd.code == 1009

    asyncio.run(run())
    assert httpx.get(f"{url}/health").json()["status"] == "ok" and proc.poll() is None


def test_request_timeouts(server, media):
    """A slow upload gets 408 and an idle stream is closed, both after request_timeout_s."""
    url, proc, _ = server
    ws_url = url.replace("http", "ws") + "/v1/stream"

    async def slow_body():
        for _ in range(3):
            yield b"\x00" * 1000
            await asyncio.sleep(TIMEOUT_S / 2 + 0.5)

    async def slow_upload():
        async with httpx.AsyncClient(timeout=60) as client:
            return await client.post(
                f"{url}/v1/score", content=slow_body(), headers={**AUTH, "Content-Type": "video/mp4"}
            )

    async def idle_stream():
        async with connect(ws_url, additional_headers=AUTH) as ws:
            message = json.loads(await ws.recv())
            with pytest.raises(ConnectionClosed) as err:
                await ws.recv()
            return message, err.value.rcvd.code

    async def run():
        return await asyncio.gather(slow_upload(), idle_stream())

    start = time.monotonic()
    response, (message, code) = asyncio.run(run())
    assert response.status_code == 408 and response.json()["limit"] == "request_timeout_s"
    assert code == 1008 and message["limit"] == "request_timeout_s"
    assert time.monotonic() - start < 4 * TIMEOUT_S
    assert httpx.get(f"{url}/health").json()["status"] == "ok" and proc.poll() is None


def test_load_test_paces_its_clients_and_counts_what_came_back(server):
    """benchmarks/load_test.py against the running service: a stream at 5 frames/s for 3 s sends at most 16
    frames (its pace, not the server's speed, bounds it), every clip is counted whole, nothing fails."""
    url, proc, _ = server
    _health_when_streams_closed(url)  # the earlier tests' streams are closed: max_streams is 2
    done = run_script(
        "benchmarks/load_test.py", "--url", url, "--server_pid", proc.pid, "--api_key", KEY, "--streams", "1",
        "--fps", "5", "--clip_clients", "1", "--clip_frames", "6", "--seconds", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = {line.split(":")[0]: line for line in done.stdout.splitlines()}
    streamed = int(re.search(r"streams: (\d+) frames in (\d+) requests", lines["streams"]).group(1))
    clipped, clips = map(int, re.search(r"clips: (\d+) frames in (\d+) requests", lines["clips"]).groups())
    assert 1 <= streamed <= 16 and clips >= 1 and clipped == 6 * clips, done.stdout
    assert lines["all"].endswith("errors 0") and "frames 24x16" in done.stdout
    assert "server memory (RSS)" in done.stdout and "HTTP Request" not in done.stdout + done.stderr


def test_the_alarm_options_are_batch_scoring_s(trained, media, tmp_path, caplog):
    """serve.py --fpr, --alarm_min_frames and --alarm_gap shape its alarms as batch_scoring.py's options of those
    names shape alarms.csv."""
    import serve
    from models.data.frames import read_video
    from models.data.index import Video
    from models.service import ScoringModel, ServiceSettings

    options = ["--fpr", "0.2", "--alarm_min_frames", "2", "--alarm_gap", "1"]
    done = run_script(
        "batch_scoring.py", "--model_dir", trained, "--input", media / "Test001.mp4", "--scored_data", tmp_path / "s",
        "--overlays", "0", *options,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    expected = pd.read_csv(tmp_path / "s" / "alarms.csv")
    args = serve.parse_args(["--model_dir", str(trained), *options])
    settings = ServiceSettings(fpr=args.fpr, alarm_min_frames=args.alarm_min_frames, alarm_gap=args.alarm_gap)
    model = ScoringModel(trained, settings)
    assert (model.rule.min_frames, model.rule.gap) == (2, 1) and model.rule.threshold == pytest.approx(-np.log10(0.2))
    X = read_video(Video("Test001", "test", media / "Test001.mp4"), model.size, model.channels)
    _, events = model.score_clip(X, "Test001", settings.batch_size)
    assert len(expected) > 0  # a low threshold: alarms to compare
    pd.testing.assert_frame_equal(events[expected.columns], expected, check_dtype=False, atol=1e-6)
    # --sample_fps: the clip at 30 frames/s (each frame three times) scores as the clip, on its own frame numbers
    assert serve.parse_args(["--model_dir", str(trained), "--sample_fps", "10"]).sample_fps == 10
    fast, fast_events = model.score_clip(np.repeat(X, 3, axis=0), "Test001", settings.batch_size, None, step=3)
    slow, _ = model.score_clip(X, "Test001", settings.batch_size)
    assert fast["frame"].tolist() == list(range(1, 3 * len(X), 3))
    np.testing.assert_allclose(fast["score"], slow["score"], atol=1e-6, equal_nan=True)
    assert fast_events["start_frame"].tolist() == [1 + 3 * (f - 1) for f in events["start_frame"]]
    with caplog.at_level("WARNING"):  # rarer than the calibration frames show: said, as batch_scoring.py says it
        ScoringModel(trained, ServiceSettings(fpr=1e-4))
    assert any("--fpr 0.0001 is below 1 in" in r.getMessage() for r in caplog.records), caplog.text


def test_startup_errors_are_one_line(trained, tmp_path):
    no_cal = tmp_path / "no_cal"
    no_cal.mkdir()
    for name in ("model.keras", "config.json"):
        (no_cal / name).write_bytes((trained / name).read_bytes())
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    cases = [
        (["--model_dir", tmp_path / "missing", "--port", "0"], "does not exist"),
        (["--model_dir", tmp_path, "--port", "0"], "is not a model folder (no config.json)"),  # a folder of yours
        (["--model_dir", no_cal, "--port", "0"], "No calibration"),
        (["--model_dir", trained, "--port", str(taken.getsockname()[1])], "Cannot listen on 127.0.0.1"),
        (["--model_dir", trained, "--port", "70000"], "--port must be 0 to 65535"),
    ]
    try:
        for args, message in cases:
            done = run_script("serve.py", *args)
            assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-500:])
            assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    finally:
        taken.close()
    # on every interface without a key: said at once (here before the model's own error ends the start)
    done = run_script("serve.py", "--model_dir", no_cal, "--port", "0", "--host", "0.0.0.0")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2 and "No calibration" in lines[1], done.stderr
    assert lines[0].startswith("warning: listening on 0.0.0.0 without an API key: anyone who can reach")
    config = tmp_path / "serve.json"
    config.write_text('{"api_key": "s3cret-in-a-file", "max_streams": 3}')
    done = run_script("serve.py", "--config", config, "--help")  # the help shows the file's values, not its key
    assert done.returncode == 0 and "(the --config file: 3)" in done.stdout, done.stdout
    assert "s3cret" not in done.stdout and "(the --config file: set, not shown)" in done.stdout
    for args, message in (
        (["--max_streams", "0"], "argument --max_streams: must be 1 or more"),
        (["--request_timeout_s", "-1"], "argument --request_timeout_s: must be greater than 0"),
    ):
        done = run_script("serve.py", "--model_dir", trained, *args)  # argparse's message, as the other scripts
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr[-500:])


@pytest.mark.filterwarnings("ignore:In the future `np.object`:FutureWarning")  # Keras's tf2onnx patch
def test_exported_model_gives_the_keras_outputs(trained, tmp_path):
    import tensorflow as tf

    from models.export import export_scorer, scorer_for_export

    with pytest.raises(PipelineError, match=r"Model folder .*missing does not exist; run train.py first"):
        export_scorer(tmp_path / "missing", tmp_path / "export")
    path = export_scorer(trained, tmp_path / "export")
    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    assert meta["window"] == 4 and meta["per_window"] == 2 and (tmp_path / "export" / "calibration.json").is_file()
    scorer, _, _, per_window = scorer_for_export(trained)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 4, 16, 24, 1), dtype=np.uint8)
    fed = np.zeros((3, 4), np.float32)
    pick = np.zeros((3, per_window, 4), np.float32)
    pick[:, [0, 1], [2, 3]] = 1
    expected = scorer.predict_on_batch([frames, fed, pick])
    loaded = tf.saved_model.load(str(path))  # kept: its functions need the object's variables alive
    out = loaded.serve([frames, fed, pick])
    for key in ("prediction", "error"):
        np.testing.assert_allclose(np.asarray(out[key]), expected[key], atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("tf2onnx")
    onnx_path = export_scorer(trained, tmp_path / "onnx", "onnx")
    session = ort.InferenceSession(str(onnx_path))
    names = [i.name for i in session.get_inputs()]
    assert names == ["frames", "fed", "pick"]
    outputs = session.run(None, {"frames": frames, "fed": fed, "pick": pick})
    got = {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}
    for key in ("prediction", "error"):
        np.testing.assert_allclose(got[key], expected[key], atol=1e-5)
