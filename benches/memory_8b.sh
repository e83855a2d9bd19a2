#!/usr/bin/env bash
# Peak memory and time of `tunecheck inspect` and `tunecheck quantize` on a Llama-3.1-8B-shaped
# bf16 checkpoint (about 16 GB in 4 shards), each run inside a 4 GiB memory cgroup (cgroup v1,
# needs root). Prints one line per command: wall time, peak resident set (from /usr/bin/time),
# and whether the cgroup had to refuse memory (failcnt) or killed the process.
#
#   benches/memory_8b.sh [WORKDIR]     # default WORKDIR: target/memory-8b (needs ~23 GB free)
#
# The README quotes its output. `tests/streaming.rs` checks the same property at small scale
# in `cargo test` (peak RSS far below the checkpoint's size).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-target/memory-8b}
limit=$((4 * 1024 * 1024 * 1024))
mkdir -p "$work"
cargo build --release --quiet
bin=target/release/tunecheck

cat > "$work/config.json" <<'EOF'
{
  "model_type": "llama", "architectures": ["LlamaForCausalLM"],
  "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
  "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": false,
  "rope_theta": 500000.0,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
  "hidden_act": "silu", "torch_dtype": "bfloat16"
}
EOF

if [ ! -f "$work/model/tunecheck-save.json" ]; then
  echo "synthesising the 8B-shaped checkpoint (outside the cgroup) ..."
  /usr/bin/time -f "synth: %e s, peak RSS %M KiB" \
    "$bin" synth --config "$work/config.json" --seed 0 --shard-bytes 4500000000 --out "$work/model"
fi
du -sh "$work/model"

cg=/sys/fs/cgroup/memory/tunecheck-8b
if [ ! -d /sys/fs/cgroup/memory ]; then
  echo "no cgroup v1 memory controller here; run as root on a machine that has one" >&2
  exit 2
fi
mkdir -p "$cg"
echo "$limit" > "$cg/memory.limit_in_bytes"
if [ -f "$cg/memory.memsw.limit_in_bytes" ]; then echo "$limit" > "$cg/memory.memsw.limit_in_bytes" || true; fi

run() {
  local name=$1; shift
  echo 0 > "$cg/memory.failcnt" || true
  echo 0 > "$cg/memory.max_usage_in_bytes" || true
  # Drop this machine's page cache so the run reads the checkpoint from disk.
  sync; echo 3 > /proc/sys/vm/drop_caches || true
  set +e
  sh -c 'echo $$ > '"$cg"'/cgroup.procs && exec "$@"' sh \
    /usr/bin/time -f "$name: %e s wall, peak RSS %M KiB" "$@" > "$work/$name.out" 2> "$work/$name.err"
  local rc=$?
  set -e
  grep -h "peak RSS" "$work/$name.err" | tail -1
  echo "$name: exit $rc, cgroup limit 4 GiB, failcnt $(cat "$cg/memory.failcnt"), oom kills $(awk '/^oom_kill /{print $2}' "$cg/memory.oom_control")"
}

run inspect "$bin" inspect "$work/model"
rm -rf "$work/q"
run quantize "$bin" quantize --model "$work/model" --out "$work/q"
du -sh "$work/q"
rmdir "$cg" 2>/dev/null || true
