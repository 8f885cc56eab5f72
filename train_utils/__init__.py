"""Everything around the network: data formats, the training engine, evaluation, inference and pictures.

Subpackages by concern: ``data/`` (readers, catalog, transforms, samplers), ``model/`` (the model
schema and builder), ``engine/`` (training), ``evaluation/``, ``inference/`` (loading a detector,
ONNX) and ``vis/`` (drawing, curves). ``checkpoint`` is the one checkpoint format; ``distributed``
(process groups and collectives) is a low-level helper that imports only torch.
"""
