"""The web service of `serve.py`: a trained model and its calibration, scoring clips and live streams.

    POST /v1/score      a video file or an archive of frames -> every frame's score and alarm, the alarms
    WS   /v1/stream     one encoded frame per message -> that frame's score and alarm, as it comes
    GET  /health        liveness, open streams, how many windows each shared model call carried
    GET  /v1/model      frame size, training data, calibration, limits, package versions
    GET  /docs          OpenAPI documentation

A clip is scored by `models.live.score_frames`, the function behind `batch_scoring.py --input`, on the
frames its reader gives (`models.uploads`), so a file gets the same numbers from both. A stream keeps the
model's states (`models.streaming.StreamState`, two model steps per frame) and a `StreamScorer` per
connection, whose scores equal the batch scores of the same frames; the frames of all open streams share
model calls through one `StateBatcher`. Limits (`Limits`) bound every request, and each refusal is a 4xx
with a JSON body {"error": ..., "limit": ...} naming the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import importlib.metadata
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.websockets import WebSocketDisconnect

from models.alarms import DEFAULT_GAP, DEFAULT_MIN_FRAMES, AlarmRule, alarm_events
from models.calibration import FILENAME, Calibration
from models.cli import package_versions
from models.data import frames as frame_io
from models.data.inputs import frame_step
from models.errors import PipelineError
from models.inference import check_model_dir
from models.uploads import ACCEPTED, Deadline, FrameDecoder, Limits, UploadError, media_type, read_upload, safe_name

log = logging.getLogger("prednet.service")
DRAIN_BYTES = 16 * 1024 * 1024  # past the upload limit, read this much more before answering 413
SERVICE_PACKAGES = ("fastapi", "starlette", "uvicorn", "pydantic", "websockets")
API_KEY_ENV = "PREDNET_API_KEY"
MAX_FPS = 1000  # the most frames per second a request may name (?fps=); cameras run at 1-120


@dataclass
class ServiceSettings:
    """How the service runs; `serve.py` sets the limits and the key.

    Attributes:
        limits: what one request may ask.
        api_key: required in `X-API-Key` or `Authorization: Bearer` when set (never logged).
        calibration: a calibration.json to use instead of the model folder's (a camera recalibrated with
            `batch_scoring.py --calibrate_on`).
        fpr, alarm_min_frames, alarm_gap: the alarm, as batch_scoring.py's options of those names (fpr: None
            keeps the calibration's).
        sample_fps: score a clip at about this many frames a second, as batch_scoring.py --sample_fps.
        batch_size: windows per model call when scoring a clip (batch_scoring.py's default: the same numbers).
        max_batch: streams per shared model call at most.
        max_wait_ms: how long a stream's frame waits for others to share its call.
        clip_workers: clips scored at once; more wait, within their request time.
        warm_up: compile the model paths at startup, so the first requests are not slow.
    """

    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    calibration: str | None = None
    batch_size: int = 64
    max_batch: int = 32
    max_wait_ms: float = 5.0
    fpr: float | None = None
    sample_fps: float | None = None
    alarm_min_frames: int = DEFAULT_MIN_FRAMES
    alarm_gap: int = DEFAULT_GAP
    clip_workers: int = 1
    warm_up: bool = True


class FrameResult(BaseModel):
    frame: int
    score: float | None
    alarm: int
    copy_score: float | None = None


class AlarmEvent(BaseModel):
    video: str
    start_frame: int
    end_frame: int
    peak_frame: int
    peak_score: float


class ScoreResponse(BaseModel):
    video: str
    n_frames: int
    frames_lost: int
    fps: float
    threshold: float
    frames: list[FrameResult]
    alarms: list[AlarmEvent]
    seconds: float


class ErrorResponse(BaseModel):
    error: str
    limit: str | None = None


class ScoringModel:
    """The model folder loaded once: the predicting model, its config, the calibration, the stream stepper.

    Raises:
        PipelineError: no model folder, no model file, no calibration, or one that cannot score streams.
    """

    def __init__(self, model_dir: str | Path, settings: ServiceSettings):
        self.model_dir = check_model_dir(model_dir)
        cal_path = Path(settings.calibration) if settings.calibration else self.model_dir / FILENAME
        if not cal_path.is_file():
            raise PipelineError(
                f"No calibration {cal_path}: train.py writes one at the end of training; for a model trained "
                "before calibration existed, fit one with batch_scoring.py --calibrate_on and pass --calibration."
            )
        self.calibration = Calibration.load(cal_path)
        if settings.fpr:
            self.calibration.fpr = settings.fpr
            note = self.calibration.extrapolated_fpr_note()
            if note:
                log.warning(note)
        if not self.calibration.window:
            raise PipelineError(f"{cal_path} scores whole videos (window 0); the service needs a windowed one.")
        from models.inference import load_predictor  # Keras, once the folder is known to be usable
        from models.registry import model_name, require_prednet
        from models.streaming import StateStepper

        self.model, trained, self.config = load_predictor(self.model_dir)
        # streams carry PredNet's states
        require_prednet(model_name(self.config), "The service", "score its videos with batch_scoring.py --input")
        self.frame_shape = tuple(int(v) for v in trained.frame_shape)
        self.rule = AlarmRule(self.calibration.threshold, settings.alarm_min_frames, settings.alarm_gap)
        cal = self.calibration
        self.stepper = StateStepper(trained, cal.window, cal.per_window, cal.horizon)

    @property
    def size(self) -> tuple[int, int]:
        return self.frame_shape[0], self.frame_shape[1]

    @property
    def channels(self) -> int:
        return self.frame_shape[2]

    def score_clip(self, X: np.ndarray, name: str, batch_size: int, progress=None, step: int = 1):
        """score_frames on one video's frames (1 in `step`): the table and the alarm events, as
        batch_scoring.py writes them."""
        from models.live import score_frames
        from models.scoring import number_in_video

        X = X[::step]
        sources = np.full(len(X), name)
        df, _, _, _ = score_frames(self.model, X, sources, self.calibration, None, batch_size, 16, self.rule, progress)
        number_in_video(df, {name: step})
        return df, alarm_events(df)

    def summary(self) -> dict:
        """What /v1/model tells: frame size, training data and results, calibration (no server paths)."""
        config, cal = self.config, self.calibration
        data = config.get("data", {})
        arguments = config.get("arguments", {})
        keep = ("dataset", "nt", "stack_sizes", "R0_channels", "strides", "nb_epoch", "horizon", "precision")
        return {
            "model": self.model_dir.name,
            "frame_shape": {"height": self.frame_shape[0], "width": self.frame_shape[1], "channels": self.channels},
            "training": {
                "arguments": {k: arguments[k] for k in keep if k in arguments},
                "frames": data.get("frames"),
                "videos": {split: len(v) for split, v in data.get("videos", {}).items()},
                "results": config.get("results"),
            },
            "calibration": {
                "threshold": cal.threshold,
                "fpr": cal.fpr,
                "window": cal.window,
                "per_window": cal.per_window,
                "horizon": cal.horizon,
                "first_scored": cal.first_scored,
                "smooth": cal.smooth,
                "cell": cal.cell,
                "fitted_on": {k: v for k, v in cal.fitted_on.items() if k not in ("dataset", "videos")},
            },
            "alarm": {"threshold": self.rule.threshold, "min_frames": self.rule.min_frames, "gap": self.rule.gap},
        }


def _versions() -> dict:
    versions = package_versions()
    for name in SERVICE_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def _key_of(headers) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _error(err: UploadError) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="prednet"'} if err.status == 401 else None
    return JSONResponse({"error": str(err), "limit": err.limit}, err.status, headers=headers)


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The request body, at most max_upload_mb; a larger one is read on (up to DRAIN_BYTES more, so that the
    client sees the answer) and refused with 413."""
    too_large = UploadError(
        f"The upload is larger than max_upload_mb = {limits.max_upload_mb:g} MB.", 413, "max_upload_mb"
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limits.max_bytes + DRAIN_BYTES:
                raise too_large
        except ValueError:
            raise UploadError(f"Bad Content-Length header: {declared!r}.", 400) from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_bytes + DRAIN_BYTES:
            break
        if size <= limits.max_bytes:
            chunks.append(chunk)
    if size > limits.max_bytes:
        raise too_large
    return b"".join(chunks)


async def _file_part(request: Request, body: bytes) -> tuple[bytes, str | None, str | None]:
    """The one file of a multipart/form-data body: its bytes, content type and file name."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream():
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=16).parse()
    except MultiPartException as err:
        raise UploadError(f"Malformed multipart body: {err.message}") from None
    try:
        upload = next((v for _, v in form.multi_items() if isinstance(v, UploadFile)), None)
        if upload is None:
            raise UploadError("The multipart body holds no file: send the video or archive in the field `file`.")
        return await upload.read(), upload.content_type, upload.filename
    finally:
        await form.close()


def create_app(model_dir: str | Path, settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI app serving the model folder `model_dir` (loaded now: errors surface before serving).

    Raises:
        PipelineError: the model folder or its calibration cannot be used.
    """
    from models.streaming import StateBatcher, StreamScorer

    settings = settings or ServiceSettings()
    limits = settings.limits
    scoring = ScoringModel(model_dir, settings)
    batcher = StateBatcher(scoring.stepper, settings.max_batch, settings.max_wait_ms)
    state = {"streams": 0, "stream_frames": 0, "clips": 0, "clip_frames": 0, "refused": 0}
    # Fixed threads for the work off the event loop: clips (decoding and scoring) and stream frames (decoding).
    # A new thread per task would let the C allocator open arena after arena (the RSS grew under load).
    clip_pool = ThreadPoolExecutor(settings.clip_workers, thread_name_prefix="clips")
    decode_pool = ThreadPoolExecutor(2, thread_name_prefix="frames")

    async def off_loop(pool: ThreadPoolExecutor, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    versions = _versions()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.warm_up:  # a short clip and a long one: the smallest and the largest call (padded_rows)
            cal = scoring.calibration
            for rows in (1, settings.batch_size):
                blank = np.zeros((cal.window + cal.per_window * (rows - 1) + 1, *scoring.frame_shape), np.uint8)
                scoring.score_clip(blank, "warm-up", settings.batch_size)
            batcher.warm_up(blank[0])
        app.state.clip_slots = asyncio.Semaphore(settings.clip_workers)
        await batcher.start()
        log.info("ready: %s answers", scoring.model_dir.name)
        yield
        await batcher.stop()
        clip_pool.shutdown(wait=False, cancel_futures=True)
        decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="PredNet video anomaly scoring",
        version="1",
        summary="Scores video clips and live camera streams with a trained PredNet and its calibration.",
        description=(
            "`POST /v1/score` takes a video file or an archive of frames; the WebSocket `/v1/stream` takes one "
            "encoded frame (PNG or JPEG bytes) per binary message and answers each with "
            '`{"frame", "score", "alarm", "copy_score"}` as JSON. See docs/serving.md.'
        ),
        lifespan=lifespan,
    )

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, err: UploadError):
        state["refused"] += 1
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, err: RequestValidationError):  # a query value of the wrong kind
        state["refused"] += 1
        problems = [f"{'.'.join(map(str, e.get('loc', ())[1:]))}: {e.get('msg', '')}" for e in err.errors()]
        return _error(UploadError(f"Bad request parameter ({'; '.join(problems)}).", 422))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):  # 404, 405: the same JSON as the rest
        return JSONResponse({"error": str(err.detail), "limit": None}, err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # answered as JSON, and the service goes on
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"error": "Internal error; the service logged it.", "limit": None}, 500)

    def authorize(request: Request) -> None:
        if settings.api_key and not _key_ok(request.headers):
            raise UploadError(
                "Missing or wrong API key: send it as X-API-Key or Authorization: Bearer.", 401, "api_key"
            )

    def _key_ok(headers) -> bool:
        key = _key_of(headers)
        return key is not None and hmac.compare_digest(key.encode(), settings.api_key.encode())

    @app.get("/health")
    async def health() -> dict:
        """Liveness (no key needed): open streams and how the shared model calls are filled."""
        return {"status": "ok", **state, "max_streams": limits.max_streams, **batcher.stats()}

    @app.get("/v1/model", dependencies=[Depends(authorize)], responses={401: {"model": ErrorResponse}})
    async def model_info() -> dict:
        """The model: frame size, training data, calibration, alarm rule, limits and package versions."""
        return {**scoring.summary(), "limits": asdict(limits), "versions": versions}

    body_doc = {"schema": {"type": "string", "format": "binary"}}
    upload_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": {"file": body_doc["schema"]}, "required": ["file"]}
                },
                **{t: body_doc for t in ACCEPTED},
            },
        }
    }
    refusals = {s: {"model": ErrorResponse} for s in (400, 401, 408, 413, 415, 422)}

    @app.post(
        "/v1/score",
        dependencies=[Depends(authorize)],
        response_model=ScoreResponse,
        responses=refusals,
        openapi_extra=upload_doc,
    )
    async def score(
        request: Request,
        video: str | None = Query(None, description="name for the video in the answer"),
        fps: float | None = Query(
            None,
            gt=0,
            le=MAX_FPS,
            description=f"frames/s of the upload (default: a video's own, 10 for frames; at most {MAX_FPS})",
        ),
    ) -> JSONResponse:
        """Scores every frame of a video file (mp4, avi, mov, mkv) or a zip/tar archive of frame files: the
        body itself with its content type, or multipart/form-data with the file in the field `file`.
        The numbers are those of `batch_scoring.py --model_dir M --input FILE`."""
        deadline = Deadline(limits.request_timeout_s)
        try:
            body = await asyncio.wait_for(_read_body(request, limits), max(deadline.left(), 0.001))
        except TimeoutError:
            raise deadline.expired() from None
        content_type, filename = request.headers.get("content-type"), None
        if media_type(content_type) == "multipart/form-data":
            body, content_type, filename = await _file_part(request, body)
        try:
            await asyncio.wait_for(app.state.clip_slots.acquire(), max(deadline.left(), 0.001))
        except TimeoutError:
            raise deadline.expired() from None
        try:
            answer = await off_loop(clip_pool, _score_upload, body, content_type, filename, video, fps, deadline)
            return JSONResponse(answer)
        finally:
            app.state.clip_slots.release()

    def _score_upload(body, content_type, filename, video, fps, deadline: Deadline) -> dict:
        upload = read_upload(body, content_type, filename, scoring.channels, scoring.size, limits, deadline, fps)
        X, name = upload.frames, safe_name(video or upload.folder or (Path(filename).stem if filename else None))
        if upload.frames_lost:
            log.warning("clip %s: %s; scored them", name, frame_io.lost_frames_note(len(X), upload.frames_lost))
        deadline.check()
        step = frame_step(upload.fps, settings.sample_fps)
        df, events = scoring.score_clip(X, name, settings.batch_size, deadline, step)
        state["clips"] += 1
        state["clip_frames"] += len(X)

        def plain(x) -> float | None:
            return float(x) if np.isfinite(x) else None

        frames = [
            {"frame": int(f), "score": plain(s), "alarm": int(a), "copy_score": plain(c)}
            for f, s, a, c in zip(df["frame"], df["score"], df["alarm"], df["copy_score"], strict=True)
        ]
        return {
            "video": name,
            "n_frames": len(df),
            "frames_lost": upload.frames_lost,
            "fps": upload.fps / step,
            "threshold": scoring.rule.threshold,
            "frames": frames,
            "alarms": events.to_dict(orient="records"),
            "seconds": round(limits.request_timeout_s - deadline.left(), 3),
        }

    @app.websocket("/v1/stream")
    async def stream(websocket: WebSocket):
        """One camera: a binary message per frame (PNG or JPEG), a JSON answer per frame, in order."""
        if settings.api_key and not _key_ok(websocket.headers):
            await _refuse(websocket, UploadError("Missing or wrong API key.", 401, "api_key"), 4401)
            return
        if state["streams"] >= limits.max_streams:
            message = f"{limits.max_streams} streams are open, the limit max_streams; try again later."
            await _refuse(websocket, UploadError(message, 429, "max_streams"), 1013)
            return
        state["streams"] += 1
        try:
            await websocket.accept()
            scorer = StreamScorer(scoring.calibration, scoring.rule)
            await _serve_stream(websocket, scorer, scoring.stepper.new_stream())
        except WebSocketDisconnect:
            pass
        except Exception:  # a client gone mid-answer, or a model failure: this stream ends, the service goes on
            log.exception("stream ended by an error")
            with contextlib.suppress(Exception):
                await websocket.close(1011, "internal error")
        finally:
            state["streams"] -= 1

    async def _serve_stream(websocket: WebSocket, scorer: StreamScorer, states) -> None:
        decoder = FrameDecoder(scoring.channels, scoring.size, limits.max_pixels)
        received = 0
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), limits.request_timeout_s)
            except TimeoutError:
                idle = f"No frame for request_timeout_s = {limits.request_timeout_s:g} s."
                await _refuse(websocket, UploadError(idle, 408, "request_timeout_s"), 1008, accepted=True)
                return
            if message["type"] == "websocket.disconnect":
                return
            received += 1
            data = message.get("bytes")
            if data is None:
                await websocket.send_json(
                    {"frame": None, "error": "Send each frame as a binary message (PNG or JPEG).", "limit": None}
                )
                continue
            try:
                frame = await off_loop(decode_pool, decoder.decode, data, f"message {received}")
            except UploadError as err:
                state["refused"] += 1
                await websocket.send_json({"frame": None, "error": str(err), "limit": err.limit})
                continue
            scored = scorer.prepare(frame)
            prediction = await batcher.submit(states, frame)  # every frame moves the states on
            result = scorer.finish(prediction if scored else None)
            state["stream_frames"] += 1
            await websocket.send_json(result.as_dict())

    async def _refuse(websocket: WebSocket, err: UploadError, code: int, accepted: bool = False) -> None:
        """Says why in a JSON message, then closes with `code` (the reason repeats the limit)."""
        state["refused"] += 1
        if not accepted:
            await websocket.accept()
        await websocket.send_json({"error": str(err), "limit": err.limit})
        await websocket.close(code, (err.limit or "refused")[:120])

    app.state.scoring = scoring
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), bound before the server starts.

    Raises:
        PipelineError: the address cannot be used (taken, not this machine's, no permission).
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        raise PipelineError(f"Cannot listen on {host}:{port}: {err.strerror or err}.") from None
    return sock


def serve(app: FastAPI, sock: socket.socket, limits: Limits, log_level: str = "info") -> None:
    """Runs the app with uvicorn on a socket from `listen` until interrupted."""
    import uvicorn

    config = uvicorn.Config(
        app,
        ws_max_size=limits.max_bytes,
        log_level=log_level,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
