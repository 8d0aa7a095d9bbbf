"""Benchmarks: in-process onnxruntime against the HTTP service, printed as ratios measured in one run."""
