"""Code both voxserve services share: config, logging, metrics, tracing, server bootstrap."""
