#!/usr/bin/env bash
# The prepared GPU check: CUDA-only tests and the speed/memory rows of docs/PERFORMANCE.md, in one
# command on a fresh GPU machine that has only torch and transformers (the device tool's image).
#
#   bash scripts/gpu_check.sh --fetch    here, with a package registry: download the wheels the GPU
#                                        image lacks into .whl/ (git-ignored; carry it to the GPU)
#   bash scripts/gpu_check.sh            on the GPU: install .whl/, run the CUDA tests and the real-time
#                                        rows (eager; the default, i.e. the compiled DiT and the channels-
#                                        last, fused, compiled VAE on a GPU; the default with CUDA graphs;
#                                        the default with attention's keys in two parts, at 10 s; the
#                                        default at 60 s), write the tables
#   bash scripts/gpu_check.sh --levers   a second call, if the session has time left: the levers against
#                                        the default at 10 s: the default timed as a render (no stage
#                                        boundaries), then the DiT's (Programmatic Dependent Launch; the
#                                        GELU as a pass of its own; q, k, v as three GEMMs; static shapes),
#                                        the VAE's and the writer's, inductor's GEMM autotuning last;
#                                        one prompt's encoding by umt5-xxl on the GPU and the CPU
#   bash scripts/gpu_check.sh --train    another call: 3 full-size DMD iterations, the per-GPU memory
#                                        of 8/64-GPU runs, and the ODE stage at full size
#   add --cpu to any of the three: the same plumbing on a CPU with configs/tiny.yaml (a dry run of
#   this script; numbers meaningless, CUDA-graph variants skipped)
#
# Output (OUT, default benchmarks/gpu_check): env.txt, tests.log, the benchmark's <tag>.json/.md and
# summary.md; --levers: summary_levers.md, text_encoder.md; --train: train.log + train_memory.md, ode.log + ode.md,
# summary_train.md. Budgets on one H100/H200: the main call's step limits add up to 540 s, --levers
# 305 s, --train 250 s (the device's calls are 10 minutes at most, its session 15 minutes in all).
# BUNDLE=DIR: when the part ends (or is stopped), its summary and one archive of every text output
# (gpu_check_<part>.tgz; no videos) go to DIR: the device tool brings back 8 files of 16 MiB at most.
# GPU_CHECK_UNTIL=<epoch seconds>: each step's limit shrinks to end by then. Main and levers in one
# device call of 600 s:
#   export GPU_CHECK_UNTIL=$(( $(date +%s) + 570 ))
#   BUNDLE=$OUT OUT=/tmp/gc bash scripts/gpu_check.sh; BUNDLE=$OUT OUT=/tmp/gc/levers bash scripts/gpu_check.sh --levers
set -euo pipefail
cd "$(dirname "$0")/.."

# what the image lacks (its KINDS.md list): diffusers, omegaconf (+ antlr4 4.9, sdist only: built
# here as a pure-Python wheel), imageio-ffmpeg (its ffmpeg binary inside); importlib-metadata for diffusers
WHEELS=(diffusers==0.42.1 omegaconf==2.3.0 imageio-ffmpeg==0.6.0 importlib-metadata)
SDIST_WHEELS=(antlr4-python3-runtime==4.9.3)
MODE=gpu
PART=main
usage() { echo "usage: bash scripts/gpu_check.sh [--levers | --train] [--fetch | --cpu]" >&2; exit 2; }
for arg in "$@"; do  # in any order
    case "$arg" in
        --levers|--train) [ "$PART" = main ] || usage; PART=${arg#--} ;;
        --fetch|--cpu) [ "$MODE" = gpu ] || usage; MODE=${arg#--} ;;
        *) usage ;;
    esac
done
if [ "$MODE" = fetch ]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 --platform any -d .whl "${WHEELS[@]}"
    python3 -m pip wheel --quiet --no-deps -w .whl "${SDIST_WHEELS[@]}"
    ls -1 .whl; du -sh .whl
    exit 0
fi

OUT=${OUT:-benchmarks/gpu_check}
mkdir -p "$OUT"
bundle() {
    [ -n "${BUNDLE:-}" ] || return 0
    local dest out
    dest=$(mkdir -p "$BUNDLE" && cd "$BUNDLE" && pwd) && out=$(cd "$OUT" && pwd) || return 0
    (cd "$out" && find . -maxdepth 2 -type f -size -4000k \( -name '*.md' -o -name '*.json' -o -name '*.log' \
        -o -name '*.txt' \) -print0 | tar czf "$dest/gpu_check_$PART.tgz" --null -T -) || true
    [ "$out" = "$dest" ] || cp "$out"/summary*.md "$dest"/ 2>/dev/null || true
}
trap bundle EXIT
# a signal (an outer time limit): bundle what there is, once the running step has ended; a step runs
# under its own `timeout`, in a process group of its own, so bound the whole run with GPU_CHECK_UNTIL
trap 'exit 143' TERM INT
# GPU_CHECK_UNTIL=<epoch seconds>: every step's limit shrinks to end by then (a combined device call
# bounds its parts this way, not with an outer timeout, which would leave a step's process running:
# each step's own timeout starts a process group of its own)
if [ -n "${GPU_CHECK_UNTIL:-}" ] && ! [[ "$GPU_CHECK_UNTIL" =~ ^[0-9]+$ ]]; then
    echo "error: GPU_CHECK_UNTIL=$GPU_CHECK_UNTIL is not a time in seconds since the epoch; set it as \$(( \$(date +%s) + 570 ))" >&2
    exit 2
fi
limit() {
    local want=$1 left
    if [ -n "${GPU_CHECK_UNTIL:-}" ]; then
        left=$(( GPU_CHECK_UNTIL - $(date +%s) ))
        [ "$left" -lt "$want" ] && want=$left
        [ "$want" -ge 1 ] || want=1
    fi
    echo "$want"
}
PY=python3
if [ "$MODE" = cpu ]; then
    PY=.venv/bin/python
elif [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "==> installing the carried wheels into /tmp/site"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1

echo "==> environment" | tee "$OUT/env.txt"
$PY - <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import platform, torch, transformers, diffusers, tokenizers
print("python", platform.python_version(), "| torch", torch.__version__, "| transformers", transformers.__version__,
      "| tokenizers", tokenizers.__version__, "| diffusers", diffusers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs", "| cuda", torch.version.cuda,
          "| cudnn", torch.backends.cudnn.version())
EOF

if [ "$MODE" = cpu ]; then
    CONFIG=(--config_path configs/tiny.yaml); SECONDS_=(2 4); EXTRA=(--repeats 1 --no_memory_pass)
    ROWS=(eager default compile compile_vae split_keys)  # CUDA graphs and streams need a GPU; on a CPU the default is eager
    LEVERS=(default render qkv_separate vae_unfused vae_contiguous sync_write)  # the *_compile ones need a GPU's compile
else
    # the full 1.3B DiT and the full Wan VAE, random weights (the benchmark puts a tiny random
    # text encoder of umt5-xxl's width in place of the real one: it runs once per prompt)
    CONFIG=(--config_path configs/infinity_rope.yaml); SECONDS_=(10 60); EXTRA=(--repeats 1 random_init=true)
    # the DiT's 60 fps is the target not met: its two candidates in the main rows, CUDA graphs (the
    # GPU's idle time, which they halved in §17) and attention's keys in two parts, one call (§25-§26); the
    # render row (the pipeline's 30 fps, met in §21) and the plain decoder are in --levers
    ROWS=(eager default default+cuda_graphs split_keys)
    # the render first (what a user's pipeline gets), then the DiT's levers (its 60 fps target is the
    # one not met): a candidate for the default, then the befores of what it has; the long
    # autotuning compile last
    LEVERS=(default render pdl_compile ffn_gelu_pass qkv_separate static_compile vae_uncompiled vae_unfused decode_stream vae_contiguous sync_write autotune_compile)
fi
# umt5-xxl's geometry (Wan2.1's text_encoder/config.json; the vocabulary left small: only a lookup)
UMT5_XXL="tiny_text_encoder={d_model: 4096, d_ff: 10240, num_layers: 24, num_heads: 64, d_kv: 64, feed_forward_proj: gated-gelu}"

if [ "$PART" = levers ]; then  # the levers against the default, at 10 s, in one process
    # (the compiled DiT's kernels come from inductor's cache after the first variant's compile)
    echo "==> levers: the default as a render; Programmatic Dependent Launch; the FFN's GELU as its own pass; q, k, v as three"
    echo "    GEMMs; the DiT with static shapes; the plain decoder; the channels-last VAE with diffusers' modules (the fused VAE's"
    echo "    before); the decode stream; the contiguous VAE; the writer on the critical path; GEMM autotuning"
    timeout "$(limit 230)" $PY scripts/benchmark.py "${CONFIG[@]}" --seconds "${SECONDS_[0]}" "${EXTRA[@]}" --variants "${LEVERS[@]}" \
        --out "$OUT" --tag "levers_$MODE" 2>&1 | tee "$OUT/levers.log" | grep -v "it/s\]$" || true
    levers_rc=${PIPESTATUS[0]}
    echo "==> one prompt's encoding by umt5-xxl (random weights), on the GPU and offloaded to the CPU"
    if [ "$MODE" = cpu ]; then TEXT=(--devices cpu "${CONFIG[@]}"); else
        TEXT=(--devices cuda,cpu "${CONFIG[@]}" random_init=true tokenizer_path=tests/assets/tokenizer "$UMT5_XXL"); fi
    timeout "$(limit 75)" $PY scripts/text_encoder_latency.py "${TEXT[@]}" --repeats 1 --out "$OUT/text_encoder.md" \
        > "$OUT/text_encoder.log" 2>&1 || true
    { echo "# GPU check, levers ($(date -u +%Y-%m-%d), $MODE)"; echo; sed 's/^/    /' "$OUT/env.txt"; echo
      cat "$OUT/levers_$MODE.md" 2>/dev/null || echo "(no table: see levers.log)"; echo
      [ "$levers_rc" = 124 ] && echo "(the levers step ran out of time: the variants after the table's last row are missing)"
      grep -h "CUDA graphs:" "$OUT/levers.log" 2>/dev/null | sed 's/^.*INFO /    /' || true; echo
      cat "$OUT/text_encoder.md" 2>/dev/null || echo "(no text encoder table: see text_encoder.log)"; } \
        > "$OUT/summary_levers.md"
    cat "$OUT/summary_levers.md"
    exit 0
fi

if [ "$PART" = main ]; then
    echo "==> tests that need CUDA, and the test fixtures on this machine's library versions" | tee "$OUT/tests.log"
    # -rs lists skips: on the GPU nothing of these may be skipped for want of CUDA; -m "not slow"
    # leaves out the CPU-only inductor compiles (CI runs them), which would eat this step's time, and
    # -k the CPU tests of the benchmark and the scripts (~50 s on 2 cores): the steps below run them
    set +e
    timeout "$(limit 190)" $PY -m pytest -q -rs -m "not slow" -k "not benchmark and not script" -p no:cacheprovider \
        tests/test_fast_paths.py tests/test_text_encoder.py \
        tests/test_video.py::test_pending_frames_from_the_gpu_equal_the_cpu_conversion tests/test_rollout.py \
        tests/test_wan.py::test_cuda_fused_feed_forward_is_as_close_to_float32_as_the_modules tests/test_fusion_report.py \
        tests/test_vae.py::test_cuda_bf16_fused_decode_is_as_close_to_fp32_as_diffusers 2>&1 | tee -a "$OUT/tests.log"
    tests_rc=${PIPESTATUS[0]}
    set -e

    # the baseline and the default first: if the step runs out of time, it is the candidates' rows
    # that are lost (default: compile=auto compiles on a GPU)
    echo "==> benchmark at ${SECONDS_[0]} s: ${ROWS[*]};"
    echo "    each profiled over 2 steady blocks (device time by kind of kernel)"
    timeout "$(limit 220)" $PY scripts/benchmark.py "${CONFIG[@]}" --seconds "${SECONDS_[0]}" "${EXTRA[@]}" \
        --variants "${ROWS[@]}" --profile_blocks 2 --out "$OUT" --tag "rows_$MODE" 2>&1 \
        | tee "$OUT/benchmark.log" | grep -v "it/s\]$" || true
    echo "==> peak memory of the eager pipeline, counted per tensor next to the allocator's own (6 blocks)"
    DEV=cuda; [ "$MODE" = cpu ] && DEV=cpu
    timeout "$(limit 30)" $PY scripts/peak_memory.py "${CONFIG[@]}" --blocks 6 --device $DEV 2>&1 | tee "$OUT/peak_memory.txt" || true
    echo "==> benchmark at ${SECONDS_[1]} s: the default (steady speed and flat memory over a longer video)"
    timeout "$(limit 100)" $PY scripts/benchmark.py "${CONFIG[@]}" --seconds "${SECONDS_[1]}" "${EXTRA[@]}" --variants default \
        --out "$OUT" --tag "rows_long_$MODE" 2>&1 | tee "$OUT/benchmark_long.log" | grep -v "it/s\]$" || true

    {
        echo "# GPU check ($(date -u +%Y-%m-%d), $MODE)"
        echo
        sed 's/^/    /' "$OUT/env.txt"
        echo
        echo "CUDA tests exit code: $tests_rc ($(grep -E 'passed|failed' "$OUT/tests.log" | tail -1))"
        echo
        cat "$OUT/rows_$MODE.md" 2>/dev/null || echo "(benchmark produced no table: see benchmark.log)"
        echo
        cat "$OUT/rows_long_$MODE.md" 2>/dev/null || echo "(long benchmark produced no table: see benchmark_long.log)"
        echo
        sed 's/^/    /' "$OUT/peak_memory.txt" 2>/dev/null || true
    } > "$OUT/summary.md"
    cat "$OUT/summary.md"
    [ "$tests_rc" = 0 ]
    exit $?
fi

# --train
echo "==> training: 3 DMD iterations (generator + critic steps each), world size 1, checkpointing, no save"
TRAIN=(--logdir "$OUT/train" --disable-wandb random_init=true train.max_iters=3 train.total_batch_size=1
       train.dfake_gen_update_ratio=1 train.save_every=0 train.data_path=tests/assets/train_prompts.txt)
if [ "$MODE" = cpu ]; then
    TRAIN=(--config_path configs/tiny_dmd.yaml "${TRAIN[@]}")
else  # the method's config at full size (1.3B geometry, bf16 compute, 21 x 60 x 104 latents)
    TRAIN=(--config_path configs/self_forcing_dmd.yaml "${TRAIN[@]}" tokenizer_path=tests/assets/tokenizer
           "tiny_text_encoder={d_model: 4096, d_ff: 64, num_layers: 1, num_heads: 2, d_kv: 16}")
fi
rm -rf "$OUT/train"
set +e
timeout "$(limit 120)" $PY train.py "${TRAIN[@]}" > "$OUT/train.log" 2>&1
train_rc=$?
set -e
tail -5 "$OUT/train.log"
$PY scripts/train_memory.py --config_path "${TRAIN[1]}" --metrics "$OUT/train/metrics.jsonl" --world 1 8 64 \
    > "$OUT/train_memory.md" 2>&1 || true
cat "$OUT/train_memory.md"

echo "==> the ODE stage: one trajectory of the full geometry (ode.sample_steps=2), then 3 regression iterations"
ODE=(ode.max_prompts=1 ode.sample_steps=2 ode.prompts_path=tests/assets/train_prompts.txt
     "train.data_path=$OUT/ode_trajectories")
if [ "$MODE" = cpu ]; then
    ODE=(--config_path configs/tiny_ode.yaml "${ODE[@]}")
else  # configs/ode_init.yaml at full size: the base DiT samples, the generator regresses (bf16, checkpointing)
    ODE=(--config_path configs/ode_init.yaml "${ODE[@]}" random_init=true tokenizer_path=tests/assets/tokenizer
         "tiny_text_encoder={d_model: 4096, d_ff: 64, num_layers: 1, num_heads: 2, d_kv: 16}")
fi
rm -rf "$OUT/ode_trajectories" "$OUT/ode"
set +e
timeout "$(limit 60)" $PY scripts/ode_trajectories.py "${ODE[@]}" > "$OUT/ode.log" 2>&1
timeout "$(limit 70)" $PY train.py --logdir "$OUT/ode" --disable-wandb "${ODE[@]}" train.max_iters=3 train.total_batch_size=1 \
    train.save_every=0 >> "$OUT/ode.log" 2>&1
ode_rc=$?
set -e
grep -E "trajectories in|step [0-9]+ \|" "$OUT/ode.log" | sed 's/^.*INFO [a-z_.]*: //' > "$OUT/ode.md" || true
cat "$OUT/ode.md"

{
    echo "# GPU check, training ($(date -u +%Y-%m-%d), $MODE)"
    echo
    sed 's/^/    /' "$OUT/env.txt"
    echo
    echo "## Training step (exit code $train_rc; train.log)"
    echo
    cat "$OUT/train_memory.md"
    echo
    echo "## ODE stage (exit code $ode_rc; ode.log)"
    echo
    sed 's/^/    /' "$OUT/ode.md"
} > "$OUT/summary_train.md"
cat "$OUT/summary_train.md"
[ "$train_rc" = 0 ] && [ "$ode_rc" = 0 ]
