"""The voxserve model store: downloads, validates and keeps speech models on disk."""
