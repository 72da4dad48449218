#!/usr/bin/env bash
# Run every check: all notebooks with nbdev_test, then the pytest suite (which includes a papermill
# smoke run of the training notebook). Ends with one line "N passed, N failed" over both.
# Usage: bash tools/test.sh [pytest arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
# Use the environment made by tools/setup.sh unless one is already active.
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/python ]; then source .venv/bin/activate; fi
export COCOMIX_DATA=${COCOMIX_DATA:-$(cd .. && pwd)/shared/data/coco2017-mini}
log_dir=$(mktemp -d)

notebooks=$(ls nbs/*.ipynb | wc -l)
nbdev_test --n_workers 2 2> >(tee "$log_dir/nbdev.err" >&2)
notebooks_failed=$(grep -c $'^\t' "$log_dir/nbdev.err" || true)
echo "nbdev_test: $((notebooks - notebooks_failed)) of $notebooks notebooks passed"

python -m pytest -q --junitxml="$log_dir/pytest.xml" "$@"
read -r tests failures errors skipped < <(python - "$log_dir/pytest.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    print(*(suite.get(k, "0") for k in ("tests", "failures", "errors", "skipped")))
except (OSError, ET.ParseError):
    print(0, 0, 1, 0)  # pytest crashed before writing its report: count it as one failure
PY
)
passed=$((notebooks - notebooks_failed + tests - failures - errors - skipped))
failed=$((notebooks_failed + failures + errors))
echo "$passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
