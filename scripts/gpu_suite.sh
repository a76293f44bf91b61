#!/usr/bin/env bash
# The open issues' GPU measurements, in priority order, inside one time budget.
#
#   LIMIT=570 bash scripts/gpu_suite.sh [ITEM ...]      # default: every item, in the order below
#
# Each item states how many seconds it needs (cold machine, compile cache in /tmp/iecc shared by all items) and is
# skipped when the time left would not cover it, so one call of the device tool gives what it can instead of
# being cut off mid-run. Logs and JSON go to $OUT (default out/suite); `$OUT/res` holds one line per item.
set -uo pipefail
cd "$(dirname "$0")/.."

LIMIT=${LIMIT:-570}
OUT=${OUT:-out/suite}
mkdir -p "$OUT"
START=$(date +%s)
CC=/tmp/iecc
MODEL=${MODEL:-llama-3-8b}  # another preset ("default") checks the commands on a CPU
B1="--model $MODEL --load-format dummy --dtype bfloat16 --input-len 128 --output-len 512 --num-prompts 1
    --max-num-seqs 1 --max-num-batched-tokens 256 --compilation-cache-dir $CC"

left() { echo $((LIMIT - ($(date +%s) - START))); }

# run NAME SECONDS CMD...: run CMD under the time left when SECONDS fit, log to $OUT/NAME.log, note rc in $OUT/res.
run() {
  local name=$1 need=$2; shift 2
  local have; have=$(left)
  if [ "$have" -lt "$need" ]; then
    echo "$name skipped (needs ${need}s, ${have}s left)" | tee -a "$OUT/res"
    return
  fi
  local t0; t0=$(date +%s)
  timeout "$have" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/res"
  tail -n 6 "$OUT/$name.log"
}

item_b1() { run b1_plain 90 python scripts/bench_throughput.py $B1 --out "$OUT"; }
# where the batch-1 step's time goes now (the last kernel list is from 12-03, before add + norm and q's kernel)
item_b1_profile() {
  run b1_profile 90 python scripts/profile_step.py --model $MODEL --batch 1 --context 384 --max-num-seqs 1 \
    --max-num-batched-tokens 256 --out "$OUT"
}
item_lora() { run b1_lora 90 python scripts/bench_throughput.py $B1 --enable-lora --random-loras 1 --out "$OUT"; }
item_spec() {
  run b1_spec 90 python scripts/bench_throughput.py $B1 --max-num-seqs 8 \
    --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' --out "$OUT"
}
# Offline 128/128 x 1,000 (fp8 cache): bf16 weights (the bar's setting), then fp8 weights (-q fp8, as TensorRT-LLM's
# published 27,911 tok/s uses), same machine.
T128="--model $MODEL --load-format dummy --dtype bfloat16 --input-len 128 --output-len 128 --num-prompts 1000
      --max-num-seqs 1024 --max-num-batched-tokens 16384 --kv-cache-dtype fp8 --compilation-cache-dir $CC"
item_t128() { run t128_bf16w 150 python scripts/bench_throughput.py $T128 --out "$OUT"; }
# the same with XLA's Triton GEMMs off (cuBLAS only), in case compile_fp8's 16,384-row bf16 GEMMs are faster so
item_t128_notriton() {
  IE_JAX_XLA_OPTIONS=xla_gpu_enable_triton_gemm=false run t128_notriton 150 python scripts/bench_throughput.py \
    $T128 --out "$OUT"
}
# fp8 weights compile each bucket for 10-30 s (H100, session 14): the buckets a 128/128 run steps in, no more
item_t128_fp8w() {
  run t128_fp8w 240 python scripts/bench_throughput.py $T128 -q fp8 --token-buckets 8,128,256,512,1024,16384 \
    --out "$OUT"
}
# what the fp8 compile time is: XLA's defaults against Triton GEMMs off and autotuning off, a process each
# (and the prefill step's bf16 GEMMs at 16,384 rows per option: they ran at ~700 TFLOP/s in the 12-03 profile)
item_compile_fp8() {
  run compile_fp8 200 python scripts/bench_compile.py --rows 1024,16384 --shapes gate_up,down \
    --variants default,no_triton_gemm --out "$OUT/compile_fp8.json"
}
item_tests() {
  run gpu_tests 150 python -m pytest -q -m gpu -x tests/kernels/test_quant_gemm.py tests/engine/test_engine_gpu.py \
    tests/kernels/test_add_norm.py -k "split or prompt_logprobs or llama_3_8b"
}
item_guided() { run b1_guided 90 python scripts/bench_throughput.py $B1 --guided-regex "[a-z0-9 ]*" --out "$OUT"; }
item_quant_split() {
  run quant_split 120 python scripts/bench_kernels.py quant --shapes down --ms 128,256 \
    --only "int4 linear,int8 linear,int4 gemm 128x128x4s4,int8 gemm 128x128x4s4" --out "$OUT"
}
item_quant_large_m() {  # which weight layout XLA's bf16 dot is fast on, and a dequantize-once path (quant v10)
  run quant_large_m 150 python scripts/bench_kernels.py quant --shapes gate_up,down --ms 4096,1024 \
    --only "bf16 xla,int8 xla,int4 xla,int8 deq,int4 deq,int8 linear,int4 linear" --out "$OUT"
}
# the fp8 many-row GEMM (fp8_gemm.py): its GPU check first (a hang costs 100 s, not the call), then every config
# against XLA's fp8 dot (what those rows run now) and cuBLAS bf16 at 128, 256 and 1,024 rows
item_fp8_gemm() {
  run fp8_gemm_check 100 timeout 100 python -m pytest -q -m gpu -x tests/kernels/test_fp8_gemm.py
  grep -q "passed" "$OUT/fp8_gemm_check.log" || return
  run fp8_gemm 150 python scripts/bench_kernels.py quant --shapes qkv,o,gate_up,down --ms 128,256,1024 \
    --only "bf16 xla,fp8 xla nk,fp8 gemm,fp8 linear" --out "$OUT"
}
# what the fp8 Linear runs now (the GEMM where fp8_gemm.gemm_config says), against XLA's fp8 dot and cuBLAS bf16
item_fp8_linear() {
  run fp8_gemm_check 100 timeout 100 python -m pytest -q -m gpu -x tests/kernels/test_fp8_gemm.py
  run fp8_linear 120 python scripts/bench_kernels.py quant --shapes qkv,o,gate_up,down --ms 128,256,1024 \
    --only "fp8 linear,fp8 xla nk" --out "$OUT"
  # 4,096 rows (#7's fp8 bar: 1.5x cuBLAS bf16; XLA's dot there was 1.28-1.54x on the H200): the GEMM's large tiles
  run fp8_gemm_4096 90 python scripts/bench_kernels.py quant --shapes qkv,o,down --ms 4096 \
    --only "fp8 xla nk,fp8 gemm 128x256x3,fp8 gemm 256x128x3,fp8 gemm 128x128x4" --out "$OUT"
}
item_paged_fp8_b1() {
  run paged_fp8_b1 90 python scripts/bench_kernels.py paged --short --fp8 --decode-tiles --tiles-only \
    --cases "b1 ctx32768" --out "$OUT"
}
item_lora_t1024() {
  for lora in "" --enable-lora; do
    run "t1024_profile${lora:+_lora}" 120 python scripts/profile_step.py --model $MODEL --batch 1000 --context 192 \
      --kv-cache-dtype fp8 --max-num-seqs 1024 --max-num-batched-tokens 16384 $lora --out "$OUT"
  done
}
item_dispatch() {
  run dispatch 200 python scripts/bench_variants.py --variant plain= \
    --variant nocb=IE_JAX_XLA_OPTIONS=xla_gpu_enable_command_buffer= -- $B1 --out "$OUT"
}
item_serving() {
  # One server, two client runs: `bench serve` defaults at rate inf, then at 1 request/s (200 prompts).
  local have; have=$(left)
  if [ "$have" -lt 240 ]; then echo "serving skipped (needs 240s, ${have}s left)" | tee -a "$OUT/res"; return; fi
  python scripts/serve.py --model $MODEL --load-format dummy --dtype bfloat16 --kv-cache-dtype fp8 \
    --max-num-seqs 512 --max-num-batched-tokens 8192 --compilation-cache-dir $CC > "$OUT/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 180); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
  run serve_rate_inf 60 python scripts/bench_serving.py --save-result --result-dir "$OUT" --disable-tqdm
  run serve_qps1 60 python scripts/bench_serving.py --request-rate 1 --num-prompts 200 --save-result \
    --result-dir "$OUT" --disable-tqdm
  kill "$pid"; wait "$pid" 2>/dev/null
}

# Default order (2026-12-06): the H200 bars first (batch 1, 128/128 with bf16 then fp8 weights, fp8 b1 paged with the
# merge's selects), then the shipped quantized path, diagnostics, and features never run on a GPU.
ITEMS=${*:-"b1 t128 t128_fp8w paged_fp8_b1 fp8_linear quant_split b1_profile compile_fp8 lora spec tests guided t128_notriton
  quant_large_m lora_t1024 dispatch serving"}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu" || true
git rev-parse --short HEAD 2>/dev/null > "$OUT/commit" || true
for item in $ITEMS; do "item_$item"; done
echo "done in $(( $(date +%s) - START ))s" | tee -a "$OUT/res"
