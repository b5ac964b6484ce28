"""Triton kernels with PyTorch references: fused GroupNorm(+SiLU) and flash attention.

    from castle_kernels import group_norm, attention

Each function runs Triton on CUDA tensors when the shape is supported and the PyTorch reference
elsewhere; impl="triton" / impl="torch" (or KERNELS_IMPL=triton|torch) forces one. See the
docstrings of group_norm.py and attention.py for shapes, dtypes and limits.
"""

from .attention import attention, attention_reference
from .group_norm import group_norm, group_norm_reference

__all__ = ["attention", "attention_reference", "group_norm", "group_norm_reference"]
