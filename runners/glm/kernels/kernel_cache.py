"""Our NVRTC kernels, compiled once per (source, options, GPU arch, CUDA, torch) and kept on disk.

`torch.cuda._compile_kernel` compiles with NVRTC in every process that asks; a study's trial
processes (and later studies) ask for the same few variants again. This does what it does in
two steps (`_nvrtc_compile` -> image, `_cuda_load_module` -> kernel) and keeps the image under
`$AUTOGLM_CACHE_DIR/nvrtc/`, keyed by a hash of everything that decides it. Without a cache
folder, or if torch's private helpers moved, it is `torch.cuda._compile_kernel` as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runners.glm.model_cache import cache_dir


def image_key(source: str, name: str, options: list[str], arch: str, versions: str) -> str:
    """Hash of what decides the compiled image."""
    blob = json.dumps([source, name, options, arch, versions])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cached_image(folder: Path, key: str, compile_image: Callable[[], tuple[bytes, str]]) -> tuple[bytes, str]:
    """(image, mangled kernel name) from `folder`, else compiled and stored (atomically)."""
    image_path, name_path = folder / f"{key}.bin", folder / f"{key}.name"
    if image_path.exists() and name_path.exists():
        return image_path.read_bytes(), name_path.read_text()
    image, mangled = compile_image()
    folder.mkdir(parents=True, exist_ok=True)
    for path, write in ((image_path, lambda p: p.write_bytes(bytes(image))),
                        (name_path, lambda p: p.write_text(mangled))):
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        write(tmp)
        tmp.replace(path)
    return bytes(image), mangled


def compile_kernel(source: str, name: str, nvcc_options: list[str]) -> Any:
    """A launchable kernel of `source`'s `name` for the current CUDA device."""
    import torch

    root = cache_dir()
    try:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile
    except ImportError:
        root = None
    if root is None:
        return torch.cuda._compile_kernel(source, name, nvcc_options=nvcc_options)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    key = image_key(source, name, nvcc_options, arch, f"{torch.__version__} {torch.version.cuda}")
    try:
        image, mangled = cached_image(root / "nvrtc", key, lambda: _nvrtc_compile(
            source, name, compute_capability=arch, nvcc_options=nvcc_options))
        module = _cuda_load_module(image, [mangled])
    except (TypeError, AttributeError, OSError):  # private helpers changed shape, or the folder is unusable
        return torch.cuda._compile_kernel(source, name, nvcc_options=nvcc_options)
    return module[mangled] if isinstance(module, dict) else getattr(module, mangled)
