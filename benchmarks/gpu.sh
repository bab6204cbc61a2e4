#!/usr/bin/env bash
# Every GPU measurement of benchmarks/README.md, for a session that is lent a GPU. Not yet run anywhere, so
# its times are guesses: about 1 minute for step 1, 3 for step 2, 4 for step 3 (four families), 2-3 for step
# 4, 2-3 for steps 5-6 (the default study, twice), up to 5 for steps 7-8 (the compiled path, the profiles) and
# 2-3 for step 9 (generate()). A device call may run 600 s and a session has 15 minutes of device time in all,
# starts included, so choose steps by what matters most: `STEPS="1 2 4" bash benchmarks/gpu.sh` first (LoFi's
# routes, the 7B prefill, the capture: issue #15 items 1 and 3), then `STEPS="5 6"` (item 4), then
# `STEPS="7 8"` (item 2's compiled path), `STEPS=9` (generate()) or `STEPS=3` (item 6) as time allows; `FROM=` / `TO=`
# bound a range instead. Prepare once on this machine, from the repository root. The device has no network,
# and it has torch 2.11 and transformers 5.17 (5.23 is this project's); its huggingface_hub 1.33, tokenizers
# 0.23.2 and safetensors 0.8.0 meet 5.23's needs (>= 1.31, >= 0.23.1, >= 0.8.0: the device README's KINDS.md).
# Older pins of those three would shadow the device's and make transformers 5.23 refuse to import (it checks
# them at import time). Its regex (>= 2025.10.22) is listed there without a version, so carry one (0.8 MB; 14
# MB with transformers).
#   mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.23.0 regex==2026.5.9
# then run it through the device tool with `carry: [".whl"]` and the command `STEPS="1 2 4" bash benchmarks/gpu.sh`.
# Everything it prints is also written under $OUT (or ./gpu-results when OUT is unset).
# DRY=1 runs every command on this machine's CPU, small (4 text layers, 1 vision layer, batch 2, one repeat,
# 4 new tokens): a check of the script, and of the code under another torch, before device time is spent. Put
# the device's versions first on PATH (torch 2.11, Python 3.12; benchmarks/README.md, "On a GPU").
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -n "${DRY:-}" ]; then LIMIT=1200 WHERE="the CPU (dry run)"; else LIMIT=300 WHERE=cuda; fi
shrink() {  # DRY: a command's words, one per line, on the CPU and small
  local previous="" script="" word
  for word in "$@"; do
    case "$previous" in
      --device) word=cpu ;; --batch) word=2 ;; --repeats) word=1 ;; --new-tokens) word=4 ;;
    esac
    [[ "$word" == benchmarks/*.py ]] && script=$word
    printf '%s\n' "$word"
    if [ "$previous" = --shape ]; then  # the shape's widths, fewer layers (LVPruning's three stages need 4)
      printf '%s\n' --text-layers 4
      [ "$script" = benchmarks/capture_overhead.py ] || printf '%s\n' --vision-layers 1
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
  if [ -n "${STEPS:-}" ]; then [[ " $STEPS " == *" $1 "* ]]; else [ "$1" -ge "${FROM:-1}" ] && [ "$1" -le "${TO:-9}" ]; fi
}

[ -n "${DRY:-}" ] || nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. LoFi's selection: exact eigendecomposition (torch's, and one batched cuSOLVER call) against subspace
#    iteration (torch's QR, CholeskyQR3), kept-set agreement and time, on real states, random 7B ones and
#    7B-size ones with concentrated energy; the two Gram routes. The batched route is checked against
#    torch.linalg.eigh first.
step 1 && run python3 benchmarks/lofi_solver.py --device cuda --batch 16 --text-layers 3
# 2. prefill at LLaVA-1.5-7B shape, batch 16 and batch 1, bf16 (measured / FLOPs-predicted, select share)
step 2 && run python3 benchmarks/prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 --repeats 3
#    batch 1 with keep = 1: the runtime's own cost (item 2: <= 3%)
step 2 && run python3 benchmarks/prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 --repeats 5 \
  --keep 1 0.5 0.25 0.1
#    LoFi again with every eigendecomposition batched into one cuSOLVER call
step 2 && LOFI_EIGH=cusolver-batched run python3 benchmarks/prefill.py --shape llava-1.5-7b --device cuda \
  --dtype bfloat16 --batch 16 --repeats 3 --methods lofi
# 3. every other family at its 7B shape, batch 16, keep 0.25
for shape in llava-next-7b llava-onevision-7b qwen2-vl-7b qwen2.5-vl-7b; do
  step 3 && run python3 benchmarks/prefill.py --shape $shape --device cuda --dtype bfloat16 --batch 16 \
    --keep 0.25 --repeats 3
done
# 4. capture overhead at 7B shape, batch 8 (IPR/PR every layer; spectra at the last layer, inline and on the
#    host; every layer)
step 4 && run python3 benchmarks/capture_overhead.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 8 \
  --repeats 5
#    the device modes again with the batched cuSOLVER route
step 4 && LOFI_EIGH=cusolver-batched run python3 benchmarks/capture_overhead.py --shape llava-1.5-7b --device cuda \
  --dtype bfloat16 --batch 8 --repeats 5 --modes every-layer last-layer
# 5. the default study on the GPU, timed (2 CPU cores: 35-38 s in session 8, 33.6 s in session 9)
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
step 6 && run python3 benchmarks/run_diff.py reports/default "$OUT/default-cuda"
step 6 && run python3 benchmarks/run_diff.py reports/default "$OUT/default-cuda-all"
# 7. the compiled path at batch 1 (item 2 of issue [G]): baseline and pruned both through lofi.compiled;
#    inductor alone, then CUDA graphs (each layer compiles once, seconds per layer, before the timed pairs)
step 7 && run python3 benchmarks/prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --repeats 5 --methods fastv lofi random --keep 0.5 0.25 --compile
step 7 && run python3 benchmarks/prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --repeats 5 --methods fastv lofi random --keep 0.5 0.25 --compile reduce-overhead
# 8. where a batch-1 prefill's time goes: launches, GPU busy time and top kernels, unpruned and pruned,
#    eager and compiled
step 8 && run python3 benchmarks/profile_prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --method fastv --keep 0.25
step 8 && run python3 benchmarks/profile_prefill.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --method fastv --keep 0.25 --compile
# 9. generate(): the prefill with its first token and each decoding step, baseline vs pruned, at batch 1 (what
#    the runtime adds to a step) and batch 16 (what a smaller KV cache saves)
step 9 && run python3 benchmarks/generate.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 1 \
  --new-tokens 32 --repeats 3
step 9 && run python3 benchmarks/generate.py --shape llava-1.5-7b --device cuda --dtype bfloat16 --batch 16 \
  --new-tokens 32 --repeats 3 --methods fastv lofi --keep 1 0.5 0.25
