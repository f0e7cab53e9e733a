#!/bin/bash
# Run the named test tiers (unit, host, lab) one after another, each with its
# own pytest summary, then recap every tier's closing line. Exit non-zero if
# any tier failed. Extra pytest arguments: PYTEST_ARGS="-k name".
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
LOGDIR=$(mktemp -d /tmp/hostagent-tiers.XXXXXX)
trap 'rm -rf "$LOGDIR"' EXIT
declare -A RC
order=()
for tier in "$@"; do
    order+=("$tier")
    echo "=================== tier: $tier ==================="
    start=$(date +%s)
    case $tier in
        unit) $BIN/python -m pytest tests/unit ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        host) $BIN/python -m pytest tests/integration ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        lab)  bash tests/lab/run.sh ${PYTEST_ARGS:-} 2>&1 | tee "$LOGDIR/$tier" ;;
        *) echo "run-tiers: unknown tier $tier" >&2; exit 2 ;;
    esac
    RC[$tier]=${PIPESTATUS[0]}
    echo "tier $tier took $(( $(date +%s) - start )) s"
done
echo "=================== summary ==================="
fail=0
for tier in "${order[@]}"; do
    line=$(grep -E '(passed|failed|error|no tests ran)' "$LOGDIR/$tier" | grep -E '^=+ .* =+$|^[0-9]+ (passed|failed)' | tail -1)
    printf '%-5s rc=%s  %s\n' "$tier" "${RC[$tier]}" "${line:-(no pytest summary)}"
    [ "${RC[$tier]}" = 0 ] || fail=1
done
exit $fail
