#!/bin/bash
# Two builds of drb, alternating, on 4k random reads at queue depth 1 and
# 32 through the double ring: the median IOPS of NEW over OLD per depth.
#   bench/compare.sh OLD_DRB NEW_DRB [RUNS]     (each DRB: a path to a `drb`)
# `sync` before every run: a build that leaves dirty pages behind would
# otherwise slow the next run, which is always the other build's.
set -euo pipefail
old=$1 new=$2 runs=${3:-5}
out=$(mktemp -d /tmp/drb-compare.XXXXXX)
for i in $(seq 1 "$runs"); do
  for side in old new; do
    sync; sleep 2
    drb=${!side}
    extra=$("$drb" bench --help | grep -q -- --no-fio && echo --no-fio || true)
    "$drb" bench --transport drb --qd 1,32 --seconds 3 $extra --json "$out/$side$i.json" \
      > /dev/null
    echo "run $i $side done" >&2
  done
done
python3 - "$out" "$runs" <<'PY'
import json, statistics, sys
out, runs = sys.argv[1], int(sys.argv[2])
for qd in (1, 32):
    def get(p):
        return next(r["iops"] for r in json.load(open(p))["runs"] if r["qd"] == qd)
    o = [get(f"{out}/old{i}.json") for i in range(1, runs + 1)]
    n = [get(f"{out}/new{i}.json") for i in range(1, runs + 1)]
    print(f"qd{qd}: old {o} new {n} median new/old {statistics.median(n) / statistics.median(o):.3f}")
PY
rm -rf "$out"
