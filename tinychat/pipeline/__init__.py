"""From a full-precision model to a quantized checkpoint on disk: calibration text (`calib`), and `quantize`, which
runs the load -> quantize -> save journey one way (tinychat.io.loader's LoadedModel record in,
tinychat.io.checkpoint out) for `tinychat quantize` and for the cache that runs a model in 4 bits on first use."""
