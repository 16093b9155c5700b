#!/usr/bin/env bash
# Profile the receiver (and the consumers) under load with py-spy; writes flame graphs and top lists.
# Usage: bench/profile_receiver.sh [rate] [seconds]   (needs: pip install py-spy; run as root or with ptrace)
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-4000}
secs=${2:-10}
out=${OUT:-/tmp/canpipe-profile}
# find py-spy before starting anything: without it there is nothing to collect
spy=.venv/bin/py-spy
if [ ! -x "$spy" ]; then
  spy=$(command -v py-spy || true)
fi
if [ -z "$spy" ]; then
  echo "profile_receiver.sh: py-spy is not installed; install it with: .venv/bin/pip install -e '.[dev]'" >&2
  exit 2
fi
mkdir -p "$out"
data=$(mktemp -d)
port=$(PYTHONPATH=tests .venv/bin/python -c "from canpipe_testing import free_port; print(free_port())")
export CANPIPE_DATA_DIR=$data CANPIPE_API_KEYS=prof:secret
.venv/bin/python -m engine serve --port "$port" > "$out/serve.log" 2>&1 &
serve=$!
.venv/bin/python -m engine consume --workers 1 > "$out/consume.log" 2>&1 &
consume=$!
trap 'kill $serve $consume 2>/dev/null; wait $serve $consume 2>/dev/null; rm -rf "$data"' EXIT
until curl -fs "http://127.0.0.1:$port/health" >/dev/null; do sleep 0.2; done
sleep 1
worker=$(cat /proc/$serve/task/$serve/children | awk '{print $1}')
consumer=$(cat /proc/$consume/task/$consume/children | tr ' ' '\n' | while read -r p; do
  grep -q spawn_main /proc/$p/cmdline 2>/dev/null && echo "$p"; done | head -n 1)
.venv/bin/python bench/loadgen.py --url "http://127.0.0.1:$port" --key prof:secret --rate "$rate" \
  --duration "$((secs + 4))" > "$out/loadgen.json" &
gen=$!
sleep 2
"$spy" record --pid "$worker" --duration "$secs" --rate 200 --format raw -o "$out/receiver.txt" --nonblocking &
spy_receiver=$!
"$spy" record --pid "$consumer" --duration "$secs" --rate 200 --format raw -o "$out/consumer.txt" --nonblocking &
spy_consumer=$!
# wait for these three only: a bare `wait` also waited for the receiver and consumers, which never exit
wait "$gen" "$spy_receiver" "$spy_consumer"
for role in receiver consumer; do
  echo "== $role: self time by function (top 25)"
  .venv/bin/python bench/fold_top.py "$out/$role.txt" > "$out/$role-top.txt"  # whole list kept; head
  head -n 25 "$out/$role-top.txt"  # reads a file, so no broken pipe fails the script under pipefail
done
