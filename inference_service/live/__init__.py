"""Live transcription: PCM in, drafts and final results out, as the audio arrives."""
