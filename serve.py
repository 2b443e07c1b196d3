r"""Serve a trained model: score video clips and live camera streams over HTTP and WebSocket.

    python serve.py --model_dir outputs/models/UCSDped2 [--host 127.0.0.1] [--port 8000] \
        [--api_key KEY (or PREDNET_API_KEY)] [--max_upload_mb 100] [--max_frames 3000] [--max_streams 16] \
        [--request_timeout_s 60]

    curl -F file=@clip.mp4 http://127.0.0.1:8000/v1/score      # every frame's score and the alarms
    ws://127.0.0.1:8000/v1/stream                              # one PNG/JPEG frame per message
    http://127.0.0.1:8000/docs                                  # the API

Scores are those of `batch_scoring.py --model_dir M --input FILE` (the same function, the same calibration:
the model folder's calibration.json, or --calibration). Binds to localhost unless --host says otherwise.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from models.args import existing_file, float_in, non_negative_int, positive_float, positive_int
from models.cli import add_alarm_options, add_sample_fps_option, import_keras, parser, run
from models.config import add_config_option, parse_with_config
from models.errors import PipelineError

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = parser(__doc__)
    add_config_option(p, '"max_streams": 32')
    p.add_argument("--model_dir", required=True, help="folder train.py wrote (model.keras, config.json, calibration)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument(
        "--port", type=non_negative_int, default=8000, help="port (default: 8000; 0: any free port, printed)"
    )
    p.add_argument(
        "--api_key",
        default=os.environ.get("PREDNET_API_KEY") or None,
        help="require this key (X-API-Key or Authorization: Bearer) on /v1/*; default: $PREDNET_API_KEY, else none",
    )
    p.add_argument(
        "--calibration", type=existing_file, default=None, help="calibration.json to use instead of the model folder's"
    )
    add_sample_fps_option(p, "for clips (a stream is scored as its frames come): ")
    add_alarm_options(p.add_argument_group("alarms (as batch_scoring.py's)"))
    g = p.add_argument_group("limits (each refusal is a 4xx naming the limit)")
    g.add_argument(
        "--max_upload_mb", type=positive_float, default=100.0, help="largest upload or stream frame (default: 100)"
    )
    g.add_argument(
        "--max_frames", type=positive_int, default=3000, help="frames per scored clip at most (default: 3000)"
    )
    g.add_argument("--max_streams", type=positive_int, default=16, help="streams open at once at most (default: 16)")
    g.add_argument(
        "--request_timeout_s",
        type=positive_float,
        default=60.0,
        help="time to receive and score a clip, or between two frames of a stream (default: 60)",
    )
    g = p.add_argument_group("model calls")
    g.add_argument("--max_batch", type=positive_int, default=32, help="stream frames per shared model call at most")
    g.add_argument(
        "--max_wait_ms", type=float_in(0), default=5.0, help="how long a frame waits for others to share a call"
    )
    p.add_argument(
        "--log_level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="level of the server's request log (uvicorn's)",
    )
    return parse_with_config(p, argv)


def check_args(args: argparse.Namespace) -> None:
    """What the argument types cannot check, refused with a one-line message."""
    if args.port > 65535:
        raise PipelineError(f"--port must be 0 to 65535. Received: {args.port}")


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    import_keras()  # after argument errors, with the native libraries' start-up lines hidden
    from models.service import ServiceSettings, create_app, listen, serve
    from models.uploads import Limits

    limits = Limits(args.max_upload_mb, args.max_frames, args.max_streams, args.request_timeout_s)
    settings = ServiceSettings(
        limits=limits,
        api_key=args.api_key,
        calibration=args.calibration,
        fpr=args.fpr,
        sample_fps=args.sample_fps,
        alarm_min_frames=args.alarm_min_frames,
        alarm_gap=args.alarm_gap,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
    )
    sock = listen(args.host, args.port)  # before loading the model: a taken port fails at once
    host, port = sock.getsockname()[:2]
    if not args.api_key and not ipaddress.ip_address(host).is_loopback:
        log.warning(
            "listening on %s without an API key: anyone who can reach this machine can score video with it; "
            "pass --api_key (or set PREDNET_API_KEY)",
            host,
        )
    app = create_app(args.model_dir, settings)
    auth = "API key required on /v1/*" if args.api_key else "no API key"
    address = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL
    log.info("warming up %s on http://%s:%s (%s; docs at /docs)", args.model_dir, address, port, auth)
    serve(app, sock, limits, args.log_level)
    return 0


if __name__ == "__main__":
    run(main)
