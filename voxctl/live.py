"""``voxctl live``: stream a file at real-time pace, or raw PCM from stdin, to StreamingTranscribe."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO, TextIO

from voxctl.output import message_to_dict, print_json_line
from voxctl.rpc import CliError, Session
from voxserve.inference.v1 import inference_pb2 as pb

RATE = 16000
CHUNK_SECONDS = 0.1
ENCODINGS = {"s16le": pb.LINEAR16, "f32le": pb.FLOAT32}
SAMPLE_BYTES = {"s16le": 2, "f32le": 4}


def file_pcm(path: str, rate: int = RATE) -> bytes:
    """A media file decoded (PyAV) to s16le mono at ``rate``."""
    import av

    try:
        container = av.open(path)
    except (OSError, av.error.FFmpegError) as error:
        raise CliError(f"cannot read {path}: {error}") from None
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    parts: list[bytes] = []
    with container:
        for frame in container.decode(audio=0):
            parts.extend(out.to_ndarray().astype("<i2").tobytes() for out in resampler.resample(frame))
        parts.extend(out.to_ndarray().astype("<i2").tobytes() for out in resampler.resample(None))
    return b"".join(parts)


def paced_chunks(source: BinaryIO | bytes, chunk_bytes: int, seconds_per_chunk: float, speed: float) -> Iterator[bytes]:
    """Chunks of ``chunk_bytes``, the n-th not before n x seconds_per_chunk / speed (speed 0:
    no pacing). A pipe (a microphone) paces itself: its reads block until audio exists."""
    started = time.monotonic()
    index = 0
    while True:
        if isinstance(source, bytes):
            block = source[index * chunk_bytes : (index + 1) * chunk_bytes]
        else:
            block = source.read(chunk_bytes)
        if not block:
            return
        if speed > 0:
            time.sleep(max(0.0, started + index * seconds_per_chunk / speed - time.monotonic()))
        yield block
        index += 1


def live_requests(
    config: pb.StreamingConfig, source: BinaryIO | bytes, speed: float = 1.0, chunk_seconds: float = CHUNK_SECONDS
) -> Iterator[pb.StreamingTranscribeRequest]:
    """The config, then the audio in ``chunk_seconds`` messages at ``speed`` x real time."""
    yield pb.StreamingTranscribeRequest(config=config)
    frame = (4 if config.encoding == pb.FLOAT32 else 2) * max(1, config.channels)
    chunk_bytes = max(frame, int(config.sample_rate_hertz * chunk_seconds) * frame)
    for block in paced_chunks(source, chunk_bytes, chunk_seconds, speed):
        yield pb.StreamingTranscribeRequest(audio=block)


class LiveView:
    """Prints a stream: on a terminal the draft line is rewritten in place and final lines
    scroll; elsewhere only final lines; ``json`` prints every response as one line."""

    def __init__(self, out: TextIO, json: bool, tty: bool) -> None:
        self.out = out
        self.json = json
        self.tty = tty
        self._draft_shown = False

    def show(self, response: pb.StreamingTranscribeResponse) -> None:
        if self.json:
            print_json_line(message_to_dict(response), self.out)
            return
        if response.WhichOneof("event") != "result":
            return
        result = response.result
        if result.is_final:
            self._clear()
            self.out.write(f"[{_clock(result.start)} -> {_clock(result.end)}] {result.text}\n")
        elif self.tty:
            self._clear()
            self.out.write(f"\x1b[2m{result.text}\x1b[0m")
            self._draft_shown = True
        self.out.flush()

    def _clear(self) -> None:
        if self._draft_shown:
            self.out.write("\r\x1b[K")
            self._draft_shown = False

    def close(self) -> None:
        self._clear()
        self.out.flush()


def _clock(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    return f"{int(minutes):02d}:{rest:05.2f}"


def streaming_config(args: argparse.Namespace, rate: int, encoding: str, channels: int) -> pb.StreamingConfig:
    return pb.StreamingConfig(
        options=pb.TranscribeOptions(
            model_id=args.model or "",
            language=args.language or "",
            beam_size=args.beam_size or 0,
            word_timestamps=args.words,
            initial_prompt=args.initial_prompt or "",
            hotwords=args.hotwords or "",
        ),
        encoding=ENCODINGS[encoding],
        sample_rate_hertz=rate,
        channels=channels,
        interim_results=not args.no_interim,
        endpoint_silence_seconds=args.endpoint_silence or 0.0,
        max_lag_seconds=args.max_lag or 0.0,
    )


def cmd_live(session: Session, args: argparse.Namespace) -> int:
    if args.file == "-":
        config = streaming_config(args, args.rate, args.encoding, args.channels)
        source: BinaryIO | bytes = sys.stdin.buffer
        speed = 0.0 if args.speed is None else args.speed  # a pipe arrives at its own pace
    else:
        config = streaming_config(args, RATE, "s16le", 1)
        source = file_pcm(args.file)
        speed = 1.0 if args.speed is None else args.speed
    json_out = args.format == "json" or (args.format is None and session.json)
    view = LiveView(session.out, json_out, tty=session.out.isatty())
    requests = live_requests(config, source, speed)
    call = session.call(session.inference().StreamingTranscribe, requests, None, model=config.options.model_id)
    try:
        for response in call:
            view.show(response)
    except KeyboardInterrupt:
        call.cancel()
        raise
    finally:
        view.close()
    return 0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser], shared: argparse.ArgumentParser) -> None:
    live = commands.add_parser(
        "live", parents=[shared], help="live transcription of a file at real-time pace, or of raw PCM on stdin"
    )
    live.add_argument("file", metavar="FILE", help="audio file, or - for raw PCM on stdin (arecord -f S16_LE ...)")
    live.add_argument(
        "--speed", type=float, metavar="X", help="send X times faster than real time (file: 1; 0 = no pacing)"
    )
    live.add_argument("--rate", type=int, default=RATE, metavar="HZ", help="stdin: sample rate (default 16000)")
    live.add_argument("--encoding", choices=sorted(ENCODINGS), default="s16le", help="stdin: sample format")
    live.add_argument("--channels", type=int, default=1, metavar="N", help="stdin: interleaved channels")
    live.add_argument("--model", metavar="ID")
    live.add_argument("--language", metavar="L")
    live.add_argument("--beam-size", type=int, metavar="N")
    live.add_argument("--words", action="store_true", help="word timestamps")
    live.add_argument("--initial-prompt", metavar="T")
    live.add_argument("--hotwords", metavar="T")
    live.add_argument("--no-interim", action="store_true", help="final results only")
    live.add_argument("--endpoint-silence", type=float, metavar="S", help="silence that ends an utterance")
    live.add_argument("--max-lag", type=float, metavar="S", help="lag above which the server decodes less often")
    live.add_argument("--format", choices=("text", "json"), help="json: every response as one line")
    live.set_defaults(handler=cmd_live)
