#!/usr/bin/env bash
# Instructions per training step of overhead.py's contenders on the tiny MLP, counted by callgrind.
#
#   benchmarks/callgrind.sh                      # raw, donated, run_epochs, logging: 300- and 100-step fits
#   benchmarks/callgrind.sh raw donated_global   # any overhead.py contender keys
#   LO=20 HI=60 benchmarks/callgrind.sh raw      # a quicker count (fewer steps, noisier)
#
# For each contender, benchmarks/_callgrind_fit.py trains HI (default 300) and then LO (default 100)
# steps under `valgrind --tool=callgrind --separate-threads=yes`; the main thread's instruction count
# (Ir) of the first minus that of the second, over HI - LO, is the count of one step: imports, set-up
# and the first calls cancel. Runs of the same count differ by about ±5 k instructions a step.
# Needs valgrind (apt-get install valgrind) and the benchmark requirements (logging: tensorboardX).
# PYTHON picks the interpreter (default: python). Each run takes minutes: valgrind runs ~50x slower.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
lo=${LO:-100}
hi=${HI:-300}
if [ $# -gt 0 ]; then keys=("$@"); else keys=(raw donated run_epochs logging); fi
if ! command -v valgrind >/dev/null; then
    echo "callgrind.sh: valgrind not found (apt-get install valgrind)" >&2
    exit 2
fi
if ! [ "$lo" -ge 1 ] 2>/dev/null || ! [ "$hi" -gt "$lo" ] 2>/dev/null; then
    echo "callgrind.sh: need 1 <= LO < HI, got LO=$lo HI=$hi" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# count KEY STEPS: the main thread's Ir of a fit of STEPS steps
count() {
    local out="$tmp/$1-$2"
    if ! OMP_NUM_THREADS=1 valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file="$out" \
            "$python" "$here/_callgrind_fit.py" "$1" "$2" >"$tmp/log" 2>&1; then
        cat "$tmp/log" >&2
        echo "callgrind.sh: the $2-step run of $1 failed" >&2
        exit 1
    fi
    # thread 1's file (--separate-threads names it OUT-01); its totals line (summary: in older valgrinds)
    awk '/^(totals|summary):/ { print $2; exit }' "$out-01"
}

echo "| contender | Ir per step (M) | × raw |"
echo "| :--- | ---: | ---: |"
raw=""
for key in "${keys[@]}"; do
    a=$(count "$key" "$hi")
    b=$(count "$key" "$lo")
    per=$(( (a - b) / (hi - lo) ))
    [ "$key" = raw ] && raw=$per
    ratio="—"
    [ -n "$raw" ] && ratio=$(awk -v p="$per" -v r="$raw" 'BEGIN { printf "%.3f×", p / r }')
    awk -v k="$key" -v p="$per" -v q="$ratio" 'BEGIN { printf "| %s | %.3f | %s |\n", k, p / 1e6, q }'
done
echo
echo "callgrind, main thread, ($hi-step fit − $lo-step fit) / $((hi - lo)) steps; tiny MLP 32-64-64-10, batch 32"
