#!/usr/bin/env bash
# Soak: the reference trainer must pass every property at every seed, not just the default.
# Runs `tunecheck check --cases CASES --seed S --json` for each seed S and reports every row
# that did not pass (with its detail and replay line) and, per property, the worst ratio of a
# measured value to its bound over all seeds (how close a correct trainer comes to a false
# alarm). Exit 0 when every seed passed, 1 otherwise.
#
#   benches/soak.sh [FIRST LAST] [CASES]        # default: seeds 1..100, --cases 64
#   TUNECHECK_BIN=target/release/tunecheck benches/soak.sh 1 20 16
#
# Time: about 30-40 s a seed at --cases 64 on 2 cores (the trainer properties run 16 cases
# per adapter kind), so 1..100 takes about an hour; CI runs a sample of seeds (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
first="${1:-1}"
last="${2:-100}"
cases="${3:-64}"
bin="${TUNECHECK_BIN:-target/debug/tunecheck}"
[ -x "$bin" ] || { echo "$bin is not built (cargo build first)" >&2; exit 2; }
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
start=$(date +%s)
for seed in $(seq "$first" "$last"); do
  set +e
  "$bin" check --cases "$cases" --seed "$seed" --json > "$out/$seed.json" 2> "$out/$seed.err"
  status=$?
  set -e
  if [ "$status" -gt 1 ]; then
    echo "seed $seed: tunecheck exited $status" >&2
    cat "$out/$seed.err" >&2
    exit 2
  fi
  echo "seed $seed: exit $status ($(( $(date +%s) - start )) s so far)"
done
python3 - "$out" "$first" "$last" "$cases" <<'PY'
import json, os, sys
d, first, last, cases = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
bad, worst = [], {}
for seed in range(first, last + 1):
    for r in json.load(open(os.path.join(d, f"{seed}.json"))):
        v = r["verdict"]
        key = (r["property"], r["family"])
        if v["verdict"] == "failed":
            bad.append((seed, key, v["detail"], v.get("replay")))
        for m in v.get("measured", []):
            ratio = 0.0 if m["value"] == 0 else m["value"] / m["bound"]
            k = (r["property"], m["what"])
            if k not in worst or ratio > worst[k][0]:
                worst[k] = (ratio, m["value"], m["bound"], seed)
print(f"\nseeds {first}..{last}, --cases {cases}: {last - first + 1 - len({b[0] for b in bad})} clean, "
      f"{len({b[0] for b in bad})} with a failure")
print("\nworst measured / bound per property and comparison:")
for (prop, what), (ratio, value, bound, seed) in sorted(worst.items()):
    print(f"  {prop:4} {ratio:6.3f}  {value:.3e} / {bound:.1e}  (seed {seed})  {what}")
for seed, (prop, fam), detail, replay in bad:
    print(f"\nFAIL seed {seed} {fam} {prop}: {detail}\n  replay: {replay}")
sys.exit(1 if bad else 0)
PY
