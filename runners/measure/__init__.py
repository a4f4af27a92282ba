"""Measurement: NVML and host sampling (`nvml`, `monitor`), hardware ceilings (`ceilings`), the
one CUDA-event timer (`cuda_timer`), the environment a trial ran in (`environment`) and the
per-trial artifact files (`artifacts`). Importing this package does not import torch."""
