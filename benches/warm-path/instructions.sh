#!/usr/bin/env bash
# Instructions per warm call, counted by valgrind's callgrind: deterministic, unlike timings on
# a shared machine. For each pattern and variant, runs the warm_path bench twice under callgrind
# (N and 2N calls, one round) and divides the difference by the extra calls, so the setup (the
# embedded server, the first token request) cancels out.
#
#   benches/warm-path/instructions.sh [pattern ...]     (default: the single-threaded patterns)
#   WARM_PATH_ARGS="..." passes more arguments to the bench.
#
# Needs valgrind. Prints a Markdown table: per pattern, the instructions per call of the inner
# service alone (`no_layer`: building, sending and dropping a request and its response), then
# what each layer adds to that, and the ratio of that to what the static header adds.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo bench -p nuvy-oauth2-bench --no-run >/dev/null 2>&1
bench=$(ls -t target/release/deps/warm_path-* | grep -v '\.d$' | head -1)
patterns=("$@")
if [ ${#patterns[@]} -eq 0 ]; then
    patterns=(single_thread/reused single_thread/clone_per_request single_thread/oneshot
        single_thread/box_clone_service single_thread/buffer)
fi
variants=(no_layer static_header mutex_cache rwlock_headers ours ours_with_retry)
calls=2000
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
instructions() { # filter calls
    valgrind --tool=callgrind --callgrind-out-file="$scratch/out" "$bench" --bench "$1" \
        --only --rounds 1 --calls "$2" ${WARM_PATH_ARGS:-} >/dev/null 2>"$scratch/err"
    sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$scratch/err"
}
echo "| pattern | no_layer (instructions per call) | static_header (added) | mutex_cache | rwlock_headers | ours | ours_with_retry |"
echo "|---|---|---|---|---|---|---|"
for pattern in "${patterns[@]}"; do
    row="| $pattern |"
    floor=
    base=
    for variant in "${variants[@]}"; do
        one=$(instructions "$pattern/$variant\$" "$calls")
        two=$(instructions "$pattern/$variant\$" $((2 * calls)))
        # Each run makes calls/10 warm-up calls plus the round's.
        per_call=$(( (two - one) * 10 / (11 * calls) ))
        if [ -z "$floor" ]; then
            floor=$per_call
            row="$row $per_call |"
        elif [ -z "$base" ]; then
            base=$((per_call - floor))
            row="$row +$base |"
        else
            added=$((per_call - floor))
            row="$row +$added ($(awk "BEGIN { printf \"%.2fx\", $added / $base }")) |"
        fi
    done
    echo "$row"
done
