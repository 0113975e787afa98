"""llama.cpp through llama-cpp-python's low-level API, for `benchmarks.determinism` and `benchmarks.kv_pool`.

    >>> session = Session(default_model_path(), Setting(), n_seq=8, n_ctx_seq=2048, unified=False)
    >>> logits = session.decode([Row(token, pos, seq_id, logits=True) for ...])   # one llama_decode
    >>> session.clear()                                                          # every sequence

No chatstream_lite engine: a model, one context, one `llama_batch`, logits copied out as
numpy arrays. Also the machine's description that every result file carries, and the GGUF
file's tensor types (read from its header, no extra package).
"""

from __future__ import annotations

import collections
import ctypes
import os
import platform
import struct
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp._logger import set_verbose

from chatstream_lite.engine.llama.kernels import Machine, choose

CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n")


def user_turn(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Setting:
    """What can change the numbers without changing the model: llama.cpp's own switches."""

    name: str = "llama.cpp defaults"
    flash_attn: bool = False    # llama-cpp-python's default (and chatstream_lite's)
    # llama_model_params.use_extra_bufts (llama-server --no-repack); None: what the server
    # picks on this machine (engine/llama/kernels.py: off where the AMX kernels fault).
    repack: bool | None = None
    threads: int = 0            # 0: every core this process may use

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Row:
    token: int
    pos: int
    seq: int
    logits: bool = False


class Session:
    """One model and one llama.cpp context of `n_seq` sequences, `n_ctx_seq` cells each
    (per-sequence streams) or `n_seq * n_ctx_seq` cells shared by all (`unified`)."""

    def __init__(self, path: Path, setting: Setting, *, n_seq: int, n_ctx_seq: int,
                 unified: bool, n_batch: int = 512) -> None:
        set_verbose(False)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = (setting.repack if setting.repack is not None
                                         else choose(Machine.detect()).extra_buffers)
        self.model = _internals.LlamaModel(path_model=str(path), params=model_params,
                                           verbose=False)
        threads = setting.threads or len(os.sched_getaffinity(0))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_seq
        params.kv_unified = unified
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if setting.flash_attn
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.context = _internals.LlamaContext(model=self.model, params=params, verbose=False)
        self.n_vocab = self.model.n_vocab()
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.context.memory, True)

    def forget(self, seq: int, start: int = 0) -> None:
        """Free the cells of `seq` from position `start` on."""
        llama_cpp.llama_memory_seq_rm(self.context.memory, seq, start, -1)

    def decode(self, rows: Sequence[Row]) -> list[np.ndarray]:
        """One `llama_decode` of `rows`; the logits of the rows that asked for them, in order."""
        assert 0 < len(rows) <= self.n_batch
        batch = self._batch
        for i, row in enumerate(rows):
            batch.token[i] = row.token
            batch.pos[i] = row.pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = row.seq
            batch.logits[i] = row.logits
        batch.n_tokens = len(rows)
        status = llama_cpp.llama_decode(self.context.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        out = []
        for i, row in enumerate(rows):
            if row.logits:
                pointer = llama_cpp.llama_get_logits_ith(self.context.ctx, i)
                out.append(np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy())
        return out

    def prefill(self, tokens: Sequence[int], seq: int, start: int = 0,
                chunk: int | None = None) -> np.ndarray:
        """Decode `tokens` of `seq` from position `start`, `chunk` tokens per call (whole
        when None); the logits of the last token."""
        chunk = chunk or self.n_batch
        logits: list[np.ndarray] = []
        for begin in range(0, len(tokens), chunk):
            piece = tokens[begin:begin + chunk]
            last = begin + len(piece) == len(tokens)
            logits = self.decode([Row(t, start + begin + i, seq, last and i == len(piece) - 1)
                                  for i, t in enumerate(piece)])
        return logits[0]

    def close(self) -> None:
        llama_cpp.llama_batch_free(self._batch)
        self.context.close()
        self.model.close()


class LogCapture:
    """llama.cpp's log lines, kept instead of printed: `with LogCapture() as log: ...`, then
    `log.matching("buffer size")` gives what it allocated (model, KV cache, compute)."""

    def __init__(self) -> None:
        self.text = ""

        @llama_cpp.llama_log_callback
        def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            self.text += text.decode("utf-8", "replace")

        self._callback = keep       # ctypes must keep it alive while llama.cpp may call it

    def __enter__(self) -> LogCapture:
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        from llama_cpp import _logger  # the bindings' own callback, restored
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    def matching(self, *words: str) -> list[str]:
        return [" ".join(line.split()) for line in self.text.splitlines()
                if any(word in line for word in words)]


# -- the machine -------------------------------------------------------------------------------
INSTRUCTION_SETS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw",
                    "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """What a result file needs to name its machine and build."""
    cpu: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "cpu family", "model", "flags") and key not in cpu:
                    cpu[key] = value.strip()
    except OSError:
        pass
    flags = set(cpu.get("flags", "").split())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=False).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "cpu_model": cpu.get("model name") or platform.processor(),
        "cpu_family": cpu.get("cpu family"), "cpu_model_number": cpu.get("model"),
        "instruction_sets": [name for name in INSTRUCTION_SETS if name in flags],
        "cores": len(os.sched_getaffinity(0)),
        "load_average": os.getloadavg(),
        "llama_cpp_python": llama_cpp.__version__,
        "ggml_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "ggml_lib": "from LLAMA_CPP_LIB_PATH" if os.environ.get("LLAMA_CPP_LIB_PATH") else "bundled",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "commit": commit + ("+changes" if dirty else ""),
        "python": platform.python_version(),
    }


def cpu_slug() -> str:
    """`amd-epyc-avx2` or `...-avx512`: the file name part that says which kind of CPU."""
    info = machine()
    name = "-".join(info["cpu_model"].lower().replace("(r)", "").replace("(tm)", "").split())
    isa = "avx512" if "avx512f" in info["instruction_sets"] else (
        "avx2" if "avx2" in info["instruction_sets"] else "noavx2")
    return f"{name}-{isa}"[:60]


# -- the GGUF file's tensor types, from its header ---------------------------------------------
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
              10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
              20: "IQ4_NL", 23: "IQ4_XS", 30: "BF16", 39: "MXFP4"}
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
           12: "d"}


def gguf_tensor_types(path: Path) -> dict[str, Any]:
    """{"counts": {"Q4_1": 210, ...}, "not_in_blocks": {"token_embd.weight": "Q8_0", ...}}"""
    def read(f: BinaryIO, fmt: str) -> Any:
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def skip_value(f: BinaryIO, kind: int) -> None:
        if kind == 8:                                   # string
            f.seek(read(f, "Q"), 1)
        elif kind == 9:                                 # array
            item, count = read(f, "I"), read(f, "Q")
            if item in _SCALAR:
                f.seek(struct.calcsize(_SCALAR[item]) * count, 1)
            else:
                for _ in range(count):
                    skip_value(f, item)
        else:
            f.seek(struct.calcsize(_SCALAR[kind]), 1)

    counts: collections.Counter[str] = collections.Counter()
    outside: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        read(f, "I")                                    # version
        n_tensors, n_kv = read(f, "Q"), read(f, "Q")
        for _ in range(n_kv):
            f.seek(read(f, "Q"), 1)                     # key
            skip_value(f, read(f, "I"))
        for _ in range(n_tensors):
            name = f.read(read(f, "Q")).decode()
            n_dims = read(f, "I")
            f.seek(8 * n_dims, 1)
            kind = GGML_TYPES.get(read(f, "I"), "other")
            read(f, "Q")                                # offset
            counts[kind] += 1
            if not name.startswith("blk."):
                outside[name] = kind
    return {"counts": dict(counts), "not_in_blocks": outside}


# -- ggml alone: one matrix product -----------------------------------------------------------
class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


class Ggml:
    """ggml's `mul_mat` on the CPU backend through ctypes, from the same libraries llama.cpp
    uses (`LLAMA_CPP_LIB_PATH` or the bundled ones): `Ggml().mul_mat(TYPE_F16, a, b)` is
    `a @ b.T` the way one layer of the model computes it."""

    F32, F16, Q4_1, Q8_0 = 0, 1, 3, 8

    def __init__(self, cpu_folder: str | None = None) -> None:
        """`cpu_folder`: take the CPU backend (libggml-cpu.so) from there instead, beside the
        one already loaded, so that two builds can be timed in turn in one process."""
        folder = os.environ.get("LLAMA_CPP_LIB_PATH") or str(Path(llama_cpp.__file__).parent / "lib")
        base = ctypes.CDLL(str(Path(folder) / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        cpu = ctypes.CDLL(str((Path(cpu_folder or folder) / "libggml-cpu.so").resolve()),
                          mode=ctypes.RTLD_LOCAL)
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        for name, restype, argtypes in (
                ("ggml_init", p, [_InitParams]), ("ggml_free", None, [p]),
                ("ggml_new_tensor_2d", p, [p, ctypes.c_int, i64, i64]),
                ("ggml_mul_mat", p, [p, p, p]), ("ggml_new_graph", p, [p]),
                ("ggml_build_forward_expand", None, [p, p]), ("ggml_get_data", p, [p]),
                ("ggml_quantize_chunk", ctypes.c_size_t, [ctypes.c_int, p, p, i64, i64, i64, p])):
            function = getattr(base, name)
            function.restype, function.argtypes = restype, argtypes
        cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
        cpu.ggml_cpu_init()
        self._base, self._cpu = base, cpu

    def mul_mat(self, kind: int, a: np.ndarray, b: np.ndarray, threads: int = 2) -> np.ndarray:
        """`a` (M x K, stored as `kind`) times each row of `b` (N x K, float32): N x M."""
        product = self.product(kind, a, b)
        try:
            product.run(threads)
            return product.result()
        finally:
            product.close()

    def product(self, kind: int, a: np.ndarray, b: np.ndarray) -> Product:
        return Product(self._base, self._cpu, kind, a, b)


class Product:
    """One ggml graph of one `mul_mat`, built once and run as often as asked (to time it)."""

    def __init__(self, base: ctypes.CDLL, cpu: ctypes.CDLL, kind: int, a: np.ndarray,
                 b: np.ndarray) -> None:
        (self.m, k), self.n = a.shape, b.shape[0]
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        b32 = np.ascontiguousarray(b, dtype=np.float32)
        size = a32.nbytes + 2 * b32.nbytes + 4 * self.n * self.m + (16 << 20)
        self._base, self._cpu = base, cpu
        self._ctx = base.ggml_init(_InitParams(size, None, False))
        ta = base.ggml_new_tensor_2d(self._ctx, kind, k, self.m)
        tb = base.ggml_new_tensor_2d(self._ctx, Ggml.F32, k, self.n)
        if kind == Ggml.F32:
            ctypes.memmove(base.ggml_get_data(ta), a32.ctypes.data, a32.nbytes)
        elif kind == Ggml.F16:
            a16 = a32.astype(np.float16)
            ctypes.memmove(base.ggml_get_data(ta), a16.ctypes.data, a16.nbytes)
        else:
            base.ggml_quantize_chunk(kind, a32.ctypes.data, base.ggml_get_data(ta), 0, self.m,
                                     k, None)
        ctypes.memmove(base.ggml_get_data(tb), b32.ctypes.data, b32.nbytes)
        self._out = base.ggml_mul_mat(self._ctx, ta, tb)
        self._graph = base.ggml_new_graph(self._ctx)
        base.ggml_build_forward_expand(self._graph, self._out)

    def run(self, threads: int = 1) -> float:
        """Compute it once; the seconds it took."""
        began = time.perf_counter()
        self._cpu.ggml_graph_compute_with_ctx(self._ctx, self._graph, threads)
        return time.perf_counter() - began

    def result(self) -> np.ndarray:
        data = ctypes.cast(self._base.ggml_get_data(self._out), ctypes.POINTER(ctypes.c_float))
        return np.ctypeslib.as_array(data, shape=(self.n, self.m)).copy()

    def close(self) -> None:
        if self._ctx:
            self._base.ggml_free(self._ctx)
            self._ctx = None
