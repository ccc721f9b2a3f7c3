#!/usr/bin/env bash
# Install what the edge targets (TFLite, TF.js) need, into the Python that runs rwkv-export, and check it works.
#
#   bash tools/install_edge_extras.sh            # uses `python` on PATH (activate the project's venv first)
#   PYTHON=.venv/bin/python bash tools/install_edge_extras.sh
#
# TFLite: our writer packs the .tflite files with ai-edge-litert's schema (no converter, no TensorFlow) and our
# quantizer (rwkv_export/targets/tflite_quant.py) makes the fp16/int8/int4 variants; ai-edge-litert is also the
# interpreter the parity check runs. ai-edge-quantizer is the tests' oracle only (tests/test_tflite_quant.py: the
# [dev] extra), which an export never imports. The pins are the ones measured beside torch==2.13.0 on Python 3.11
# (the same as the [tflite] and [dev] extras).
# TF.js: nothing in Python (our writer only needs onnx, a core dependency). The parity check runs the model in Node
# with @tensorflow/tfjs, pinned in rwkv_export/js/package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" -m pip install -q "ai-edge-litert==2.3.0" "ai-edge-quantizer==0.10.0" "flatbuffers>=24.3"

if ! command -v node >/dev/null || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "error: Node >= 20 is needed for the TF.js parity check (apt-get install nodejs npm)" >&2
  exit 1
fi
npm ci --prefix rwkv_export/js --no-audit --no-fund

# smoke check: every piece imports / loads
"$PY" - <<'PY'
import ai_edge_litert.interpreter, ai_edge_quantizer, flatbuffers  # noqa: F401
from importlib.metadata import version
print("python edge extras: ok (" + ", ".join(f"{p} {version(p)}" for p in ("ai-edge-litert", "ai-edge-quantizer", "flatbuffers")) + ")")
PY
(cd rwkv_export/js && node --input-type=module -e "import('@tensorflow/tfjs-converter').then(m => console.log('node tfjs: ok (converter', m.version_converter + ')'))")
