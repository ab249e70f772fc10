#!/usr/bin/env bash
# Train one model under several parallel layouts on this machine's GPUs, from the same initial
# weights and the same global batch (8 x seq 4096), and print one table (scripts/tools/summarize_metrics.py).
#   bash scripts/benchmarks/bench_layouts.sh configs/gla_340M.json "fsdp2 tp2 fsdp2_compile"      # 2 GPUs
#   bash scripts/benchmarks/bench_layouts.sh configs/llama_360M.json "fsdp2 tp2 hsdp2x2 fsdp4"    # 4 GPUs
# Layouts: 1gpu, fsdp2, fsdp4, tp2, fsdp2_tp2, hsdp2x2, ddp2, and any of them + _compile / _ac.
# Runs go to ${DUMP:-outputs}/layouts/<model>/<layout>/; with $OUT set, each run's metrics.jsonl is
# also copied to $OUT/<model>_<layout>.jsonl and the table to $OUT/<model>_layouts.md.
set -euo pipefail
model=$1; layouts=$2; steps=${STEPS:-30}; seq=${SEQ:-4096}; global_batch=${GLOBAL_BATCH:-8}
name=$(basename "$model" .json); root=${DUMP:-outputs}/layouts/$name; mkdir -p "$root"
init=$root/init_hf
# One set of initial weights for every layout (plain HF folder), so loss curves are comparable.
[ -d "$init" ] || python - "$model" "$init" <<'PY'
import sys
from recipe.device import configure_device
configure_device()
import torch
from transformers import AutoModelForCausalLM
from recipe.model import load_model_config
torch.manual_seed(0)
AutoModelForCausalLM.from_config(load_model_config(sys.argv[1])).save_pretrained(sys.argv[2])
PY
rows=()
for layout in $layouts; do
  base=${layout%%_compile*}; base=${base%%_ac}
  case $base in
    1gpu) n=1; par=() ;;
    fsdp2) n=2; par=() ;;
    fsdp4) n=4; par=() ;;
    tp2) n=2; par=(--parallelism.tensor_parallel_degree 2) ;;
    fsdp2_tp2) n=4; par=(--parallelism.tensor_parallel_degree 2) ;;
    hsdp2x2) n=4; par=(--parallelism.data_parallel_replicate_degree 2) ;;
    ddp2) n=2; par=(--parallelism.data_parallel_replicate_degree 2 --parallelism.data_parallel_shard_degree 1) ;;
    *) echo "unknown layout $layout" >&2; exit 2 ;;
  esac
  tp=1; [[ $base == *tp2* ]] && tp=2
  local_batch=$(( global_batch * tp / n ))
  extra=(--compile.no_enable); [[ $layout == *_compile* ]] && extra=(--compile.enable)
  [[ $layout == *_ac* ]] && extra+=(--activation_checkpoint.mode full)
  dump=$root/$layout; rm -rf "$dump"
  echo "== $name $layout: $n GPU(s), local batch $local_batch"
  mkdir -p "$dump"
  if torchrun --standalone --nproc_per_node=$n train.py --job.config_file configs/gla_340M.toml \
    --model.config "$model" --model.init_from_hf "$init" --model.tokenizer bytes --training.dataset synthetic \
    --training.steps "$steps" --training.seq_len "$seq" --training.local_batch_size "$local_batch" \
    --metrics.log_freq 1 --metrics.no_enable_tensorboard --checkpoint.no_enable --job.dump_folder "$dump" \
    "${par[@]}" "${extra[@]}" > "$dump/train.log" 2>&1; then
    grep -E "step +[0-9]+ " "$dump/train.log" | tail -2
  else
    echo "   $layout failed; the end of its log:"; grep -v -i "warn" "$dump/train.log" | tail -40
  fi
  rows+=("$name/$layout=$dump/metrics.jsonl")
  [ -n "${OUT:-}" ] && [ -f "$dump/metrics.jsonl" ] && cp "$dump/metrics.jsonl" "$OUT/${name}_${layout}.jsonl"
done
python scripts/tools/summarize_metrics.py --skip 10 "${rows[@]}" | tee ${OUT:+"$OUT/${name}_layouts.md"}
