"""Inference service: runs Whisper, Silero VAD and Demucs models fetched from the model store."""
