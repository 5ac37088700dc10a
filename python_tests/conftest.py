"""Shared test set-up. Without a GPU, Triton kernels run on CPU tensors through its interpreter, which must be switched
on before triton is first imported; with a GPU they compile for real."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
