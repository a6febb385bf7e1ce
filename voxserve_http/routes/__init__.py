"""HTTP routes: OpenAI-compatible audio and models, REST model management, health."""
