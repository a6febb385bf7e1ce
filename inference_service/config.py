"""Typed configuration of the inference service (flags, VOXSERVE_* env vars, YAML file)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from voxserve_common.config import ConfigError, ServiceSettings, check_settings

# A longer wait for company only delays work: a decode of one window takes 0.1-1 s on a CPU.
MAX_BATCH_WINDOW_MS = 1000.0
MAX_PROMPT_BUCKET_TOKENS = 223  # faster-whisper keeps the last 223 tokens of the previous text


@dataclass(frozen=True)
class InferenceConfig(ServiceSettings):
    port: int = 50052
    metrics_port: int = 9102  # -1 disables the /metrics endpoint
    model_store: str = "127.0.0.1:50051"  # address of the model store
    # The channel to the store: TLS (CA, and a client certificate for mutual TLS) and the
    # file holding this service's own token (roles read and pull).
    store_tls_ca: Path | None = None
    store_tls_cert: Path | None = None
    store_tls_key: Path | None = None
    store_token_file: Path | None = None
    # How READY files reach this node: "shared" reads the store's directory (same host
    # or a shared volume, optionally mounted at shared_store_dir); "fetch" copies them
    # with FetchModelFiles into cache_dir, checking sha256 (each service its own cache_dir:
    # the start-up removes the half-copies in cache_dir/.staging).
    store_access: str = "shared"
    shared_store_dir: Path | None = None  # the store's data_dir as mounted here
    cache_dir: Path = Path("data/inference-cache")
    auto_pull: bool = True  # pull models that are not READY through the store
    default_model: str = "whisper-tiny.en"
    vad_model: str = "silero-vad"
    # Speaker diarization's speaker-embedding model when a request names none (its speech
    # spans come from vad_model).
    diarization_model: str = "campplus-diarization"
    device: str = "auto"  # auto | cpu | cuda
    compute_type: str | None = None  # default int8 on CPU, float16 on CUDA
    cpu_threads: int = 0  # 0 = ctranslate2's default
    # Threads of numpy's BLAS (OpenBLAS: the mel spectrogram of every window, the speaker
    # clustering). 1 by default: after each call an idle OpenBLAS thread spins on a core for a
    # while, and on a CPU whose cores CTranslate2's threads keep busy that took 10 % of a core
    # from them (8 clients: 1.19x the throughput one job at a time, 1.04x with batching; live
    # finals p50 0.41 s vs 0.59-0.69 s at 10 streams; docs/performance.md, "numpy's BLAS on one
    # thread"). 0 = the library's own count (OPENBLAS_NUM_THREADS, else one per core).
    blas_threads: int = 1
    max_models: int = 3
    memory_budget: str = "80%"  # bytes, "2GiB" or a percent of device memory
    # An idle, unpinned model nobody used for this long is unloaded (0 = never), freeing its
    # memory for the models a proxy routes to this replica (deploy/haproxy).
    model_idle_ttl_seconds: float = 0.0
    preload: tuple[str, ...] = ("silero-vad", "htdemucs")
    pin: tuple[str, ...] = ("silero-vad",)
    # After a Whisper model loads, one short decode of silence runs inside the load, so the
    # first request does not pay CTranslate2's first-call costs (bench/bench_warmup.py).
    warmup: bool = True
    watchdog_interval_seconds: float = 5.0
    watchdog_threshold: float = 0.95
    # Jobs that run at once. Their windows share batches (below), so running more jobs than
    # batch_size only makes each wait for a later batch and hold its audio longer; the memory
    # they hold counts in memory_budget (a job the budget cannot hold is RESOURCE_EXHAUSTED).
    max_running_jobs: int = 8
    # One decode scheduler per loaded Whisper model runs the encoder and decoder calls of every
    # job, first-utterance decode and live stream in shared CTranslate2 batches: at most
    # batch_size calls per batch; with fewer ready, it waits up to batch_window_ms for more
    # (0 = never wait). Kept after bench/bench_batching.py (docs/performance.md, "Batch decoding
    # across requests"): on 2 CPU cores batches averaged 2.5-2.8 items at 8 clients, so the
    # cap did not bind; batch 8 is where a GPU gains.
    batch_size: int = 8
    batch_window_ms: float = 10.0
    # A prompt's previous text (faster-whisper keeps its last 223 tokens) is cut, at its oldest
    # end, to a multiple of prompt_bucket_tokens, so that the windows of different files can
    # share a decoder batch: CTranslate2 batches only prompts of one layout. The cut depends on
    # the job's own text only, never on who else is served; a job with an initial_prompt or
    # hotwords keeps its prompts whole. 0 = faster-whisper's prompts exactly. 32: at 8 clients
    # sending different audio 1.25x the throughput of exact prompts, the same WER on files that
    # decode at temperature 0 (docs/performance.md, "Prompts cut to a bucket").
    prompt_bucket_tokens: int = 32
    # CTranslate2 replicas of each Whisper model (they share its weights): with 2, latency-bound
    # calls (live decodes, first utterances, requests that fit one 30 s window) run at once
    # beside the file window already decoding instead of waiting for it (11 s requests while a
    # 5 min file ran: p95 1.34x alone instead of 1.8-1.9x). 1 by default: on a 2-core CPU the two
    # replicas' OpenMP thread teams made a request alone 1.5x slower (docs/performance.md,
    # "Two replicas"); try 2 on a GPU or where cores are plenty (2 x cpu_threads <= cores).
    decode_replicas: int = 1
    # faster-whisper's BatchedInferencePipeline, for one very long file: its VAD chunks decoded
    # batch_size at once, without the previous text as prompt nor the temperature fallback
    # (~30 s segments without word-level timing unless asked).
    batched: bool = False
    max_queued_jobs: int = 16
    max_audio_bytes: int = 200 * 1024 * 1024
    # Ended jobs stay watchable (WatchJob replays their events; their audio is dropped at the
    # end) for job_retention_seconds, the job_retention_max_jobs that ended last, and at most
    # job_retention_max_bytes of their events: the first limit reached evicts the oldest.
    # A short clip's job keeps ~10 KB, an hour of audio with word timestamps ~3 MB.
    job_retention_seconds: float = 600.0
    job_retention_max_jobs: int = 1000
    job_retention_max_bytes: int = 64 * 1024 * 1024
    job_history_events: int = 20_000  # events kept per job for WatchJob
    # Live transcription (StreamingTranscribe). Endpoint: silence that ends an utterance
    # (the client may ask for another); lag: audio received - audio processed, above
    # live_max_lag_seconds a stream decodes less often on larger chunks, above
    # live_abandon_lag_seconds it ends with RESOURCE_EXHAUSTED.
    live_max_streams: int = 8
    live_endpoint_silence_seconds: float = 0.5
    live_max_lag_seconds: float = 3.0
    live_abandon_lag_seconds: float = 20.0
    live_decode_interval_seconds: float = 0.3
    live_beam_size: int = 1  # when the client leaves beam_size at 0
    live_final_beam_size: int = 5  # the endpoint decode that makes an utterance final (client beam_size 0)
    # A live buffer's encoder window is padded to a whole number of these, so that buffers of
    # different streams batch (0: not padded; a buffer batches only with one of its exact
    # length). Costs compute when streams do not batch (engines/buffer_decoder.py).
    live_window_bucket_seconds: float = 5.0
    # Transcribe/TranscribeStream: decode the first utterance on its own so its segment is
    # sent before the first 30 s window is decoded. On by default: over 9 files of real and
    # synthetic speech its words were never worse than the plain path's (docs/performance.md,
    # "Fast first segment: the default").
    fast_first_segment: bool = True

    def validate(self) -> None:
        checks = [
            *self.common_checks(),
            (self.store_access in ("shared", "fetch"), "store_access", "must be 'shared' or 'fetch'"),
            (self.device in ("auto", "cpu", "cuda"), "device", "must be auto, cpu or cuda"),
            (self.max_models >= 1, "max_models", "must be >= 1"),
            (self.max_running_jobs >= 1, "max_running_jobs", "must be >= 1"),
            (1 <= self.batch_size <= 64, "batch_size", "must be 1-64"),
            (
                math.isfinite(self.batch_window_ms) and 0 <= self.batch_window_ms <= MAX_BATCH_WINDOW_MS,
                "batch_window_ms",
                f"must be 0-{MAX_BATCH_WINDOW_MS:g} (milliseconds; 0 = never wait for more work)",
            ),
            (
                0 <= self.prompt_bucket_tokens <= MAX_PROMPT_BUCKET_TOKENS,
                "prompt_bucket_tokens",
                f"must be 0-{MAX_PROMPT_BUCKET_TOKENS} (tokens; 0 = faster-whisper's prompts as they are)",
            ),
            (1 <= self.decode_replicas <= 8, "decode_replicas", "must be 1-8"),
            (self.max_queued_jobs >= 0, "max_queued_jobs", "must be >= 0"),
            (self.max_audio_bytes > 0, "max_audio_bytes", "must be > 0"),
            (
                math.isfinite(self.job_retention_seconds) and self.job_retention_seconds >= 0,
                "job_retention_seconds",
                "must be >= 0 (0: ended jobs are not kept)",
            ),
            (self.job_retention_max_jobs >= 0, "job_retention_max_jobs", "must be >= 0 (0: ended jobs are not kept)"),
            (self.job_retention_max_bytes >= 0, "job_retention_max_bytes", "must be >= 0 (bytes; 0: none kept)"),
            (self.job_history_events >= 10, "job_history_events", "must be >= 10"),
            (0 < self.watchdog_threshold <= 1, "watchdog_threshold", "must be in (0, 1]"),
            (self.watchdog_interval_seconds > 0, "watchdog_interval_seconds", "must be > 0"),
            (self.model_idle_ttl_seconds >= 0, "model_idle_ttl_seconds", "must be >= 0 (0 = never)"),
            (self.cpu_threads >= 0, "cpu_threads", "must be >= 0"),
            (self.blas_threads >= 0, "blas_threads", "must be >= 0 (0 = the BLAS library's own count)"),
            (self.live_max_streams >= 0, "live_max_streams", "must be >= 0 (0 refuses live streams)"),
            (0.1 <= self.live_endpoint_silence_seconds <= 10, "live_endpoint_silence_seconds", "must be 0.1-10"),
            (self.live_max_lag_seconds > 0, "live_max_lag_seconds", "must be > 0"),
            (
                self.live_abandon_lag_seconds > self.live_max_lag_seconds,
                "live_abandon_lag_seconds",
                "must be > live_max_lag_seconds",
            ),
            (0.05 <= self.live_decode_interval_seconds <= 5, "live_decode_interval_seconds", "must be 0.05-5"),
            (1 <= self.live_beam_size <= 20, "live_beam_size", "must be 1-20"),
            (1 <= self.live_final_beam_size <= 20, "live_final_beam_size", "must be 1-20"),
            (
                math.isfinite(self.live_window_bucket_seconds) and 0 <= self.live_window_bucket_seconds <= 30,
                "live_window_bucket_seconds",
                "must be 0-30 (0 = live windows are not padded)",
            ),
            (bool(self.default_model), "default_model", "must not be empty"),
        ]
        check_settings(self, checks)
        from inference_service.memory import parse_memory_budget
        from voxserve_common.errors import InvalidArgument

        try:
            parse_memory_budget(self.memory_budget, 1 << 40)
        except InvalidArgument as error:
            raise ConfigError(f"invalid setting memory_budget={self.memory_budget!r}: {error}") from None
