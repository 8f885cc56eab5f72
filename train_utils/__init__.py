"""Everything around the network: data formats, the training engine, evaluation, inference and pictures.

Subpackages by concern: ``data/`` (readers, catalog, transforms, samplers), ``model/`` (the model
schema and builder), ``engine/`` (training), ``evaluation/``, ``inference/`` (prediction, ONNX)
and ``vis/`` (drawing, curves, the report). ``checkpoint`` is the one checkpoint format and
``loading`` rebuilds a detector from a weights file; ``distributed`` (process groups and
collectives) and ``jsonl`` (the run's JSON-lines files) are low-level helpers.
tests/test_import_graph.py states the order in which these import each other.
"""
