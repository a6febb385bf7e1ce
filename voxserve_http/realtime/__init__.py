"""OpenAI Realtime transcription over WebSocket, mapped onto the live streams of the inference service."""
