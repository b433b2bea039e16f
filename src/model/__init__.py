"""The recipe's model in plain PyTorch (src/model/rwkv7.py); it imports nothing from src.kernels or src.engine."""
from src.model.rwkv7 import RWKV

__all__ = ["RWKV"]
