#!/usr/bin/env bash
# Every benchmark, one after the other (they must not share the CPU), each table saved under bench_out/results/.
#   bash benchmarks/run_all.sh            (about an hour on a 2-core machine; needs the [tflite] extra, Node, chromium)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
R=bench_out/results
mkdir -p "$R"
run() { local name=$1; shift; echo "== $name: $*"; local t=$SECONDS; "$@" > "$R/$name.md" 2> "$R/$name.log"; echo "   exit $? in $((SECONDS - t)) s"; }
run spine      "$PY" benchmarks/bench.py
run export169  "$PY" -m rwkv_export.cli onnx builtin:169m-synthetic -o bench_out/169 --quant fp16,int8,int4 --no-check --force -q
run decode     "$PY" benchmarks/bench_decode.py bench_out/169
run quant      "$PY" benchmarks/bench_quant.py
run prefill    "$PY" benchmarks/bench_prefill.py
run edge       "$PY" benchmarks/bench_edge.py
run web        "$PY" benchmarks/bench_web.py bench_out/169
run webkernels "$PY" benchmarks/bench_web_kernels.py
