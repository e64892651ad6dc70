"""A process prelude in which torch reports one CUDA device (an H200), on a CPU-only torch: what
SGLang decides at import time on CUDA can then be rehearsed here. Nothing may touch the device."""

PRELUDE = """
import torch
torch.cuda.is_available = lambda: True
torch.version.cuda = "13.0"
torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
torch.cuda.get_device_name = lambda *a, **k: "NVIDIA H200"
torch.cuda.device_count = lambda: 1
"""
