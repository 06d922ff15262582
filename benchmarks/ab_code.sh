#!/usr/bin/env bash
# Before/after of a code change in one device call, where no HETERMOE_ toggle can switch it (a kernel rewritten, an
# epilogue moved): the package at an older commit and the working tree run the same benchmark in alternating
# processes (ABAB...), each installed editable right before its run. Used for NOTES v2.24 item 3.
#
#   bash benchmarks/ab_code.sh prepare <git-ref>        # here: the package at <git-ref> into .devrun/ab_old/
#   bash benchmarks/ab_code.sh run <pairs> <bench args>  # on the device: <pairs> x (old, new) runs of
#                                                        # benchmarks/bench_experts.py <bench args>
#
# `prepare` runs where git is (the device's copy of the tree has no history); .devrun/ is untracked, so the device
# tool carries it. `run` writes the old code's rows under $OUT/old and the working tree's under $OUT; merge them with
# `python benchmarks/merge_results.py --relabel hetermoe=hetermoe@<ref> $OUT/old/...` so the old rows never read as
# today's.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${AB_OLD:-.devrun/ab_old}  # AB_OLD: elsewhere (tests)
case "${1:-}" in
  prepare)
    ref=${2:?usage: ab_code.sh prepare <git-ref>}
    git rev-parse --verify -q "$ref^{commit}" > /dev/null || { echo "ab_code.sh: no commit '$ref'" >&2; exit 2; }
    rm -rf "$OLD" && mkdir -p "$OLD"
    git archive "$ref" hf_hetermoe kernels model_patches pyproject.toml README.md | tar -x -C "$OLD"
    git rev-parse "$ref" > "$OLD/REF"
    echo "$OLD: the package at $(cat "$OLD/REF")"
    ;;
  run)
    pairs=${2:?usage: ab_code.sh run <pairs> <bench_experts.py args>}
    shift 2
    [ -f "$OLD/REF" ] || { echo "ab_code.sh: run 'ab_code.sh prepare <git-ref>' first (no $OLD/REF)" >&2; exit 2; }
    : "${OUT:?ab_code.sh run: set OUT, where the results go}"
    use() {
      python3 -m pip install -q --no-deps --no-build-isolation -e "$1" > /tmp/ab_pip.log 2>&1 \
        || { cat /tmp/ab_pip.log >&2; exit 1; }
    }
    for i in $(seq "$pairs"); do
      echo "=== old ($(cat "$OLD/REF")), run $i"
      use "$OLD"
      python3 benchmarks/bench_experts.py --out "$OUT/old" "$@"
      echo "=== new (working tree), run $i"
      use .
      python3 benchmarks/bench_experts.py --out "$OUT" "$@"
    done
    ;;
  *)
    echo "usage: bash benchmarks/ab_code.sh prepare <git-ref> | run <pairs> <bench_experts.py args>" >&2
    exit 2
    ;;
esac
