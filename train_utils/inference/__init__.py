"""Using a trained detector: predict.py's library (inputs, batches, videos, annotations), ONNX
export and runtime. Rebuilding a detector from a weights file is :mod:`train_utils.loading`."""
