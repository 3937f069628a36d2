"""The load -> quantize -> save journey, one way: `loader` opens a model source once and builds the model into a
LoadedModel record; `quantize` (with its calibration text, `calib`) quantizes it, `checkpoint` writes it; `quantize`
also holds the cache that runs a full-precision model in 4 bits on first use."""
