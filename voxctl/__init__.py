"""voxctl: the command-line client of the voxserve model store and inference service."""
