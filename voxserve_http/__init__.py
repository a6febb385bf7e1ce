"""voxserve-http: an HTTP gateway (OpenAI-compatible transcription, REST model management) over the gRPC services."""
