#!/usr/bin/env bash
# Issue 6's benchmark on every GPU of one host (an even count: half full, half EMULATED older GPUs), one torchrun
# per (model, seq_len) so that a failure (e.g. out of memory on an emulated rank) costs one case, not the sweep.
#
#   bash benchmarks/zebra_gpu.sh [OUT_DIR] [MODEL:SEQ ...]          # default: the whole sweep, NVLink
#   NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 BENCH_ARGS="--links socket" bash benchmarks/zebra_gpu.sh OUT d1:4096
#
# Rows accumulate in OUT_DIR/zebra_<gpu>[_w<W>][_<links>].csv (bench_zebra.py keeps other cases' rows).
set -uo pipefail
out=${1:-benchmarks/results}
shift || true
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(d1:4096 d1:16384 d1:32768 d1-large:4096 d1-large:16384)
W=$(python3 -c "import torch; n = torch.cuda.device_count(); print(n - n % 2)")
for c in "${cases[@]}"; do
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  BENCH_DUMP_AFTER=${BENCH_DUMP_AFTER:-280} timeout "${CASE_TIMEOUT:-300}" \
    python3 -m torch.distributed.run --nproc_per_node "$W" benchmarks/bench_zebra.py --out "$out" \
    --models "${c%%:*}" --seq-lens "${c##*:}" --timeline-model d1 ${BENCH_ARGS:-} || echo "case $c failed (exit $?)"
done
