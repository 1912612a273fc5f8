#!/usr/bin/env bash
# Runs the multi-seed studies of examples/study.py in the background, one after the other,
# from a frozen copy of a commit, appending their rows to this checkout's zoo/results/.
#
#   bash scripts/run_studies.sh [COPY_DIR] [PAPER ...]
#
# COPY_DIR (default: this checkout's path + "-run") receives `git archive HEAD`, so the code
# that trains does not change while this checkout is edited; the rows record that commit.
# PAPERs default to: shazeer eigen deepmoe two_domain. PAPER:N runs seeds 0..N-1 only, so
# `a:1 b:1 a b` trains seed 0 of both studies before their further seeds (partial results
# then span every arm); PAPER@ARM,ARM (after any :N) runs those arms only, so that the
# rows a decision waits on come first. Each study resumes where its results
# file stops (rows already there are skipped). Everything runs under `nice -n 19` in its own
# session (setsid + nohup), so it survives the shell that started it; the log is
# COPY_DIR/studies.log and the process id COPY_DIR/studies.pid. A study that fails does not
# stop the next one.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
copy="${1:-${repo}-run}"
shift || true
papers=("$@")
[ ${#papers[@]} -gt 0 ] || papers=(shazeer eigen deepmoe two_domain)
commit="$(git -C "$repo" rev-parse HEAD)"
if [ -e "$copy/studies.pid" ] && kill -0 "$(cat "$copy/studies.pid")" 2>/dev/null; then
    echo "studies already running from $copy (pid $(cat "$copy/studies.pid"))" >&2
    exit 1
fi
mkdir -p "$copy"
rm -rf "$copy/keras_moe" "$copy/examples" "$copy/zoo"
git -C "$repo" archive "$commit" keras_moe examples zoo pyproject.toml | tar -x -C "$copy"
echo "$commit" > "$copy/CODE_COMMIT"
chain="$copy/studies.sh"
{
    echo "#!/usr/bin/env bash"
    # setsid gives the chain a scheduler autogroup of its own, and Linux shares the CPU
    # between autogroups before it looks at nice values: without this line the niced
    # studies took a full core from the foreground (seen: 194% against a test run's 50%).
    echo "echo 19 > /proc/self/autogroup 2>/dev/null || true"
    echo "export PYTHONPATH='$copy' KERAS_MOE_CODE_COMMIT='$commit' TF_CPP_MIN_LOG_LEVEL=2"
    for entry in "${papers[@]}"; do
        arms=""
        spec="${entry%%@*}"
        [ "$spec" = "$entry" ] || arms=" --arms ${entry#*@}"
        paper="${spec%%:*}"
        seeds=""
        [ "$paper" = "$spec" ] || seeds=" --seeds ${spec#*:}"
        echo "echo \"== \$(date -u +%FT%TZ) $entry\""
        echo "python3 '$copy/examples/study.py' $paper$seeds$arms --results '$repo/zoo/results/$paper.jsonl' --runs-dir '$copy/runs/study' || echo \"== $entry failed: exit \$?\""
    done
    echo "echo \"== \$(date -u +%FT%TZ) done\""
} > "$chain"
nohup setsid nice -n 19 bash "$chain" >> "$copy/studies.log" 2>&1 < /dev/null &
echo $! > "$copy/studies.pid"
echo "studies ${papers[*]} running from $copy (commit $commit), pid $(cat "$copy/studies.pid"), log $copy/studies.log"
