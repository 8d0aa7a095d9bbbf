"""Training side of mnist-serve: data, Keras models, training, evaluation and ONNX export.

Everything here may import TensorFlow; nothing in ``service/`` may import anything here
except :mod:`training.data`, which needs only numpy.
"""
