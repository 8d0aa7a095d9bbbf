"""mnist-serve: the digit classifier served over HTTP (FastAPI + onnxruntime; no TensorFlow)."""
