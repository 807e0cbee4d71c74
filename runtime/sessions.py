"""ONNX Runtime sessions for a bundle's graphs, and the token-embedding table."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import BundleError
from .manifest import Manifest

log = logging.getLogger(__name__)
PROVIDERS = ("auto", "cpu", "cuda")


def resolve_provider(provider: str) -> str:
    """'auto' picks CUDA when onnxruntime-gpu is installed and sees a GPU, else CPU."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    available = ort.get_available_providers()
    if provider == "auto":
        return "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise BundleError("provider 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                          "(install the gpu extra: pip uninstall onnxruntime && pip install onnxruntime-gpu)")
    return provider


def kv_device(provider: str, kv_dtype: np.dtype) -> str:
    """Where the KV cache lives. On CUDA it stays on the GPU for an fp16 decoder. An fp32 or int8 cache
    has no CUDA GroupQueryAttention kernel (fp16/bf16 only), so ONNX Runtime runs that node on the CPU
    and its KV cache must stay in host memory; that works, slowly, and says so."""
    if provider != "cuda":
        return "cpu"
    if kv_dtype != np.float16:
        log.warning("this bundle's KV cache is %s: on CUDA its attention runs on the CPU; export with "
                    "--decoder-dtype fp16 for GPUs", kv_dtype.name)
        return "cpu"
    return "cuda"


def default_threads() -> int:
    """Physical cores are what matter for GEMM/GEMV; ORT's default also counts SMT siblings."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, n)


_RESIDENT_DTYPES = ("uint8", "int8", "float32", "float16")


def load_resident_initializers(manifest: Manifest) -> dict[str, np.ndarray]:
    """The decoder's `resident_initializers`: external tensors read into process memory here rather
    than memory-mapped by ONNX Runtime (the int4+int8 head's int8 rows, gathered 64 scattered rows per
    token: mapped, each would be a page fault, from disk on a cold page cache)."""
    out = {}
    for e in manifest["decoder"].get("resident_initializers", []):
        path = manifest.path(e["file"])
        try:
            dtype = np.dtype(e["dtype"]) if e["dtype"] in _RESIDENT_DTYPES else None
            if dtype is None or int(np.prod(e["shape"])) * dtype.itemsize != e["length"]:
                raise BundleError(f"manifest: resident initializer {e['name']!r} has a bad dtype/shape/length")
            if e["offset"] < 0 or e["offset"] + e["length"] > path.stat().st_size:
                raise BundleError(f"{path.name}: too short for {e['name']!r} (offset {e['offset']}, "
                                  f"{e['length']} bytes)")
            array = np.fromfile(path, dtype=dtype, count=e["length"] // dtype.itemsize, offset=e["offset"])
        except (KeyError, TypeError, OSError) as err:
            raise BundleError(f"manifest: resident initializer entry {e!r} is unusable ({err})") from err
        out[e["name"]] = array.reshape(e["shape"])
    return out


def create_session(path: Path, provider: str, threads: int | None = None,
                   profile_prefix: str | None = None, memory_arena: bool = True,
                   cuda_graph: bool = False, initializers: dict[str, np.ndarray] | None = None,
                   config: dict[str, str] | None = None) -> ort.InferenceSession:
    """One session per graph. memory_arena=False for the encoders: a 10-slice image needs GBs of
    activations once, and an arena would keep them for the life of the process. cuda_graph: capture
    the decode step as a CUDA graph and replay it (one launch instead of hundreds; the decoder only).
    initializers: graph initializers to take from these arrays instead of the graph's data file
    (`load_resident_initializers`). config: extra session config entries (benchmarks)."""
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = memory_arena
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    # ONNX Runtime uses these buffers in place for the session's life: they must outlive it.
    resident = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in (initializers or {}).items()}
    for name, value in resident.items():
        opts.add_initializer(name, value)
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        cuda = {"device_id": 0} | ({"enable_cuda_graph": "1"} if cuda_graph else {})
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise BundleError(f"{path.name}: ONNX Runtime could not load it: {str(e).splitlines()[0]}") from e
    session.resident_initializers = (initializers, resident)  # keeps the buffers alive with the session
    return session


def create_decoder_session(manifest: Manifest, provider: str, threads: int | None = None,
                           **kw) -> ort.InferenceSession:
    """The bundle's decoder session, with its resident initializers (the pipeline and the benchmarks)."""
    return create_session(manifest.path(manifest["decoder"]["file"]), provider, threads,
                          initializers=load_resident_initializers(manifest), **kw)


class EmbeddingTable:
    """Rows of `embed_tokens` gathered from a memory-mapped .npy (only the rows read touch memory)."""

    def __init__(self, path: Path, dtype: str, shape: list[int]):
        try:
            self._table = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise BundleError(f"{path.name}: cannot read the embedding table ({e})") from e
        if list(self._table.shape) != list(shape):
            raise BundleError(f"{path.name}: shape {list(self._table.shape)} != manifest {shape}")
        self._bf16 = dtype == "bfloat16"  # stored as the raw upper 16 bits of float32
        self.vocab_size, self.hidden_size = shape

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """ids [T] -> embeddings [T, D] float32."""
        rows = self._table[np.asarray(ids, dtype=np.int64)]
        if self._bf16:
            return (rows.astype(np.uint32) << 16).view(np.float32)
        return rows.astype(np.float32)
