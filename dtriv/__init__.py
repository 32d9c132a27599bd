"""dtriv: optimization on manifolds for PyTorch."""

__version__ = "0.1.0"
