#!/usr/bin/env bash
# Benchmark your own optimizer: sign-SGD (signsgd.py, conf/optimizer/signsgd.yaml) against Adam and AdaFisher
# at equal training time on the suite's bundled MNIST-5k digits, then the report, all in this folder:
#   runs/            the results store (every run: config, metrics, summary)
#   report/tables/   signsgd_equal_time.md / .csv / .tex (and report/figures/)
# Works from any folder this one is copied to, with fisherbench installed (pip install fisherbench) or on
# PYTHONPATH. Extra arguments go to the sweep, e.g. `./run.sh --seeds 0,1,2` or `./run.sh --dry-run`.
# Run it again and finished runs are skipped (edit signsgd.py and sign-SGD runs again: the code's hash is
# part of the run's identity).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
# `_target_: signsgd.SignSGD` imports signsgd.py from here; the sweep's runs inherit both variables
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny models: one thread per run is the fastest on a CPU

"$python" -m fisherbench sweep signsgd_equal_time --config-dir "$here/conf" --results-dir "$here/runs" "$@"
case " $* " in *" --dry-run "*) exit 0 ;; esac
"$python" -m fisherbench report signsgd_equal_time --config-dir "$here/conf" --results-dir "$here/runs" \
    --out "$here/report"
echo "report: $here/report/tables/signsgd_equal_time.md"
