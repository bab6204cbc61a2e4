#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md in one script, run from the repository root on a machine with
# one CUDA GPU:
#   bash benchmarks/gpu.sh                   # steps 1-10
#   STEPS="1 2 4" bash benchmarks/gpu.sh     # only these steps
#   FROM=5 TO=6 bash benchmarks/gpu.sh       # a range of steps
# Everything it prints is also appended to $OUT/all.log (OUT defaults to ./gpu-results); the default study's
# run folders go under $OUT too. Each command stops after 300 s (1200 s with DRY=1). The steps:
#   1 LoFi's routes to leverage scores (benchmarks.lofi_solver)  2 the prefill at LLaVA-1.5-7B shape, batch 16
#   and 1  3 every other family's prefill at its 7B shape  4 the capture's overhead  5 the default study on the
#   GPU  6 its tables against the committed CPU run  7 the compiled batch-1 prefill (and its CUDA graphs)
#   8 a batch-1 prefill's profile and op counts  9 generate(): steps, keep = 1 identity, a step's ops
#   10 CPU decompositions idle and under load.
# The project needs transformers 5.20-5.23. On a GPU machine without network access whose transformers is
# older, download the wheels here first (transformers 5.23 also needs huggingface_hub >= 1.31, tokenizers
# >= 0.23.1, safetensors >= 0.8.0 and regex >= 2025.10.22; only download those the machine lacks, since an
# older wheel would shadow a newer installed one), then copy .whl/ with the checkout:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.23.0 regex==2026.5.9
# The script installs them into .whl/site and puts that first on PYTHONPATH.
# DRY=1 runs every command on this machine's CPU, small (4 text layers, 1 vision layer, batch 2, one repeat,
# 4 new tokens, float32): a check of the script, and of the code under another torch, before a GPU run. Put
# the GPU machine's Python and torch first on PATH to check them too.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site .whl/*.whl \
    && export PYTHONPATH=$PWD/.whl/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -n "${DRY:-}" ]; then LIMIT=1200 WHERE="the CPU (dry run)"; else LIMIT=300 WHERE=cuda; fi
shrink() {  # DRY: a command's words, one per line, on the CPU and small
  local previous="" script="" word
  for word in "$@"; do
    case "$previous" in
      --device) word=cpu ;; --batch) word=2 ;; --repeats) word=1 ;; --new-tokens) word=4 ;; --large-tokens) word=300 ;;
      --dtype) word=float32 ;;  # a CPU without AVX512-BF16 runs bf16 products ~5x slower; tests cover bf16
    esac
    [[ "$word" == benchmarks.* ]] && script=$word
    printf '%s\n' "$word"
    if [ "$previous" = --shape ]; then  # the shape's widths, fewer layers (LVPruning's three stages need 4)
      printf '%s\n' --text-layers 4
      [ "$script" = benchmarks.capture_overhead ] || printf '%s\n' --vision-layers 1
    fi
    previous=$word
  done
}
run() {
  local command=("$@")
  [ -n "${DRY:-}" ] && mapfile -t command < <(shrink "$@")
  echo "== ${command[*]}" | tee -a "$OUT/all.log"
  timeout "$LIMIT" "${command[@]}" 2>&1 | tee -a "$OUT/all.log"
}
step() {  # STEPS="1 2 4": only those; else FROM / TO: only steps FROM..TO
  if [ -n "${STEPS:-}" ]; then [[ " $STEPS " == *" $1 "* ]]; else [ "$1" -ge "${FROM:-1}" ] && [ "$1" -le "${TO:-10}" ]; fi
}

[ -n "${DRY:-}" ] || nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. LoFi's selection: exact eigendecomposition (torch's, and one batched cuSOLVER call) against the
#    products route (purification) and subspace iteration (torch's QR, CholeskyQR3): kept-set agreement, op
#    counts and time on real states, random 7B ones and 7B-size ones with concentrated energy, and at
#    LLaVA-OneVision's 3,699 x 3,584 (batch 8, spread and concentrated); the two Gram routes. The batched
#    route is checked against torch.linalg.eigh first.
step 1 && run python3 -m benchmarks.lofi_solver --device cuda --batch 16 --text-layers 3 --large-tokens 3699
# 2. prefill at LLaVA-1.5-7B shape, batch 16 and batch 1, bf16 (measured / FLOPs-predicted, select share)
step 2 && run python3 -m benchmarks.prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 --repeats 3
#    batch 1, keep = 1 included: the runtime's own cost where nothing is dropped
step 2 && run python3 -m benchmarks.prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 --repeats 5 \
  --keep 1 0.5 0.25 0.1
# 3. every other family at its 7B shape, batch 16, keep 0.25
for shape in llava-next-7b llava-onevision-7b qwen2-vl-7b qwen2.5-vl-7b; do
  step 3 && run python3 -m benchmarks.prefill --shape $shape --device cuda --dtype bfloat16 --batch 16 \
    --keep 0.25 --repeats 3
done
# 4. capture overhead at 7B shape, batch 8 (IPR/PR every layer; spectra at the last layer, inline and on the
#    host; every layer)
step 4 && run python3 -m benchmarks.capture_overhead --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 8 \
  --repeats 5
#    the device modes again with the batched cuSOLVER route
step 4 && LOFI_EIGH=cusolver-batched run python3 -m benchmarks.capture_overhead --shape llava-1.5-7b --device cuda \
  --dtype bfloat16 --batch 8 --repeats 5 --modes every-layer last-layer
# 5. the default study on the GPU, timed (benchmarks/README.md gives the CPU's time)
if step 5; then
  start=$(date +%s)
  run python3 -m analysis.compare --methods lofi lvpruning fastv --device cuda --out "$OUT/default-cuda" --no-progress
  echo "default compare on $WHERE: $(( $(date +%s) - start )) s" | tee -a "$OUT/all.log"
fi
#    and the CPU run's full job (spectra at every layer), decomposed on the GPU through batched cuSOLVER
if step 5; then
  start=$(date +%s)
  LOFI_EIGH=cusolver-batched run python3 -m analysis.compare --methods lofi lvpruning fastv --device cuda \
    --spectrum-layers all --spectra-on device --out "$OUT/default-cuda-all" --no-progress
  echo "default compare on $WHERE, every layer's spectrum, batched eigh: $(( $(date +%s) - start )) s" \
    | tee -a "$OUT/all.log"
fi
# 6. how far the GPU runs' tables are from the committed CPU run's (same job, same seed)
step 6 && run python3 -m benchmarks.run_diff reports/default "$OUT/default-cuda"
step 6 && run python3 -m benchmarks.run_diff reports/default "$OUT/default-cuda-all"
# 7. the compiled path at batch 1: baseline and pruned both through lofi.compiled;
#    inductor alone, then CUDA graphs (each layer compiles once, seconds per layer, before the timed pairs)
step 7 && run python3 -m benchmarks.prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --repeats 5 --methods fastv lofi random --keep 0.5 0.25 --compile
step 7 && run python3 -m benchmarks.prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --repeats 5 --methods fastv lofi random --keep 0.5 0.25 --compile reduce-overhead
# 8. where a batch-1 prefill's time goes: launches, GPU busy time and top kernels, unpruned and pruned,
#    eager and compiled; CUDA graphs' capture under reduce-overhead (skips, recorded graphs, graph launches)
step 8 && run python3 -m benchmarks.profile_prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --method fastv --keep 0.25
step 8 && run python3 -m benchmarks.profile_prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --method fastv --keep 0.25 --compile
step 8 && run python3 -m benchmarks.profile_prefill --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --method fastv --keep 0.25 --compile reduce-overhead
#    the aten ops of a batch-1 prefill, the model's and the runtime's, and where each host sync falls
step 8 && run python3 -m benchmarks.op_counts --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1
# 9. generate(): the prefill with its first token and each decoding step, baseline vs pruned, at batch 1 (what
#    the runtime adds to a step) and batch 16 (what a smaller KV cache saves)
step 9 && run python3 -m benchmarks.generate --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --new-tokens 32 --repeats 3
step 9 && run python3 -m benchmarks.generate --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 \
  --new-tokens 32 --repeats 3 --methods fastv lofi --keep 1 0.5 0.25
#    keep = 1 against the baseline with deterministic kernels: what numerics alone change (the control column)
step 9 && run python3 -m benchmarks.generate --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 \
  --new-tokens 32 --repeats 1 --methods fastv lofi --keep 1 --deterministic
#    a decoding step's ops, launches and device busy time, unpruned and pruned, batch 16
step 9 && run python3 -m benchmarks.step_ops --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 \
  --keep 0.25
# 10. CPU decompositions on this machine's cores, idle and beside another process (torch's threads vs lofi's)
step 10 && run python3 -m benchmarks.eigh_threads --sizes 576 1536
