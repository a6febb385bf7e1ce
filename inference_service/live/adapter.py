"""Protobuf messages of StreamingTranscribe to and from the live domain (no grpc here).

The servicer hands its request iterator to ``stream_responses`` and yields what comes
back; errors are domain errors, mapped to status codes at the edge like everywhere else.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from inference_service.engines.whisper import TranscribeOptions
from inference_service.live.pcm import Encoding
from inference_service.live.service import LiveService, StreamRequest
from inference_service.live.session import LiveResult, SpeechEvent
from inference_service.live.stream import StreamEvent
from inference_service.payloads import Accepted, Completed
from voxserve.inference.v1 import inference_pb2 as pb
from voxserve_common.client_strings import check_job_id
from voxserve_common.errors import InvalidArgument
from voxserve_common.streams import to_timestamp

ENCODINGS = {pb.LINEAR16: Encoding.LINEAR16, pb.FLOAT32: Encoding.FLOAT32}
SPEECH_EVENTS = {"SPEECH_STARTED": pb.SPEECH_STARTED, "END_OF_UTTERANCE": pb.END_OF_UTTERANCE}


# The servicer's TranscribeOptions decoding: (model_id, engine options, separate_model_id, job_id).
OptionsDecoder = Callable[[pb.TranscribeOptions], tuple[str, TranscribeOptions, str, str]]


def request_from_config(config: pb.StreamingConfig, decode_options: OptionsDecoder) -> StreamRequest:
    """Raises InvalidArgument for an unknown encoding, a rate of 0, bad channels or options."""
    if config.encoding not in ENCODINGS:
        raise InvalidArgument(f"encoding {config.encoding} is not supported; use LINEAR16 (s16le) or FLOAT32 (f32le)")
    if config.sample_rate_hertz <= 0:
        raise InvalidArgument(
            f"sample_rate_hertz must be positive, got {config.sample_rate_hertz}; 16000 needs no resampling"
        )
    if config.channels < 0:
        raise InvalidArgument(f"channels must be >= 0 (0 = mono), got {config.channels}")
    if config.options.separate_model_id:
        raise InvalidArgument("separate_model_id is not available for live streams; leave it empty")
    model_id, options, _, job_id = decode_options(config.options)
    return StreamRequest(
        model_id=model_id,
        options=options,
        encoding=ENCODINGS[config.encoding],
        sample_rate=config.sample_rate_hertz,
        channels=config.channels or 1,
        interim_results=config.interim_results,
        endpoint_silence=config.endpoint_silence_seconds,
        max_lag=config.max_lag_seconds,
        job_id=check_job_id(job_id) if job_id else uuid.uuid4().hex,
        beam_size_given=config.options.beam_size > 0,
    )


async def audio_messages(requests: AsyncIterator[pb.StreamingTranscribeRequest]) -> AsyncIterator[bytes]:
    """The audio of every message after the config (InvalidArgument for a second config)."""
    async for message in requests:
        if message.HasField("config"):
            raise InvalidArgument("only the first StreamingTranscribeRequest may carry a config; send audio after it")
        yield message.audio


async def stream_responses(
    live: LiveService, requests: AsyncIterator[pb.StreamingTranscribeRequest], decode_options: OptionsDecoder
) -> AsyncGenerator[pb.StreamingTranscribeResponse, None]:
    """The whole call: the first message must be the config, then audio until half-close."""
    first = await anext(aiter(requests), None)
    if first is None:
        raise InvalidArgument("the stream held no messages; send a StreamingConfig first, then audio")
    if not first.HasField("config"):
        raise InvalidArgument("the first StreamingTranscribeRequest must carry a config (encoding, sample rate...)")
    request = request_from_config(first.config, decode_options)
    async for event in live.run(request, audio_messages(requests)):
        yield event_to_pb(event, request.job_id)


def event_to_pb(event: StreamEvent, job_id: str) -> pb.StreamingTranscribeResponse:
    message = pb.StreamingTranscribeResponse(
        job_id=job_id or uuid.uuid4().hex,
        sequence=event.sequence,
        timestamp=to_timestamp(event.timestamp),
        audio_received_seconds=event.audio_received,
        audio_processed_seconds=event.audio_processed,
    )
    payload = event.payload
    if isinstance(payload, LiveResult):
        message.result.CopyFrom(
            pb.StreamingResult(
                result_id=payload.result_id,
                is_final=payload.is_final,
                stability=payload.stability,
                start=payload.start,
                end=payload.end,
                text=payload.text,
                words=[
                    pb.Word(start=w.start, end=w.end, word=w.word, probability=w.probability) for w in payload.words
                ],
            )
        )
    elif isinstance(payload, SpeechEvent):
        message.speech_event.CopyFrom(pb.SpeechEvent(type=SPEECH_EVENTS[payload.kind], time=payload.time))
    elif isinstance(payload, Accepted):
        message.accepted.CopyFrom(accepted_to_pb(payload))
    elif isinstance(payload, Completed):
        message.completed.CopyFrom(completed_to_pb(payload))
    return message


def accepted_to_pb(payload: Accepted) -> pb.Accepted:
    """The ``accepted`` event of a job or a live stream."""
    return pb.Accepted(queue_position=payload.queue_position, model_id=payload.model_id)


def completed_to_pb(payload: Completed) -> pb.Completed:
    """The ``completed`` event of a job or a live stream."""
    return pb.Completed(
        audio_seconds=payload.audio_seconds,
        processing_seconds=payload.processing_seconds,
        real_time_factor=payload.real_time_factor,
        model_load_seconds=payload.model_load_seconds,
        cache_hit=payload.cache_hit,
        segments=payload.segments,
        text=payload.text,
    )
