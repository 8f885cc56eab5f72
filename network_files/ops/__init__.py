"""Low-level operations of the detector and its backbones: RoIAlign and multi-scale pooling,
box arithmetic, the sparse-gradient convolution, the fast-path switch and trace-safe sizes.

They import only torch and torchvision (and each other), so ``backbone/`` may use them without
depending on the detector in ``network_files/``.
"""
