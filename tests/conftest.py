"""Test-wide settings: one torch thread, offline hub, deterministic algorithms where torch has them, and no GPU
(stages pick cuda when they see one; the tests' reference bits are CPU bits, on any machine)."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
