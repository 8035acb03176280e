#!/usr/bin/env bash
# The GPU runs behind the committed H200 records, as two commands on a 2 x H200 machine
# (`nvidia-h200-x2`); each writes its records and logs to $OUT (default: runs/h200).
#
#   bash experiments/run_h200.sh train_and_bench   # GPU 0: 9-minute reproduction; GPU 1: benchmark
#   bash experiments/run_h200.sh tp_hf_domain      # both: 31B tensor parallel; then GPU 0:
#                                                  # transformers side by side; GPU 1: new domain
#   bash experiments/run_h200.sh variants_and_bench  # GPU 0: drafter variants (issue 8);
#                                                  # GPU 1: benchmark again (keeps its hf part)
#   bash experiments/run_h200.sh fused_one_gpu     # one H200: step probe, benchmark with the
#                                                  # fused layout, adaptive segments (runs O-T)
#   bash experiments/run_h200.sh paired_probe      # one H200: two-row step, cuDNN attention,
#                                                  # adaptive with 5 passes (runs U, V)
#   bash experiments/run_h200.sh adaptive_cmdbuf   # one H200: adaptive, command buffers (run W)
#   bash experiments/run_h200.sh switch_root       # one H200: runs X, Y
#   bash experiments/run_h200.sh conditional_cmdbuf  # one H200: run Z
#   bash experiments/run_h200.sh unrolled_drafts   # one H200: round probe (run AA), unrolled (AB)
#   bash experiments/run_h200.sh dispatch_compare  # one H200: adaptive 'loops' vs 'switch' (AC)
#   bash experiments/run_h200.sh gpu_pair          # one H200: GPU pair + workloads (run AJ)
#   bash experiments/run_h200.sh loop_graphs       # one H200: GPU-pair-shaped rounds under
#                                                  # XLA's command-buffer settings (run AH)
#   bash experiments/run_h200.sh pair_layouts      # one H200: the same rounds, fused layout and
#                                                  # one-row pads (run AI)
#   bash experiments/run_h200.sh drafter_kernels   # one H200: the drafter step as Pallas kernels:
#                                                  # tests on the GPU, rounds without / with (AL)
#   bash experiments/run_h200.sh gpu_pair_kernels  # one H200: run AJ with those kernels (AM)
#   bash experiments/run_h200.sh gpu_pair_warm     # one H200: run AM with 'adaptive, warm' (AO)
#   bash experiments/run_h200.sh gpu_pair_k16      # one H200: run AO with buckets 2..16 (AP)
#   bash experiments/run_h200.sh gpu_pair_steps8   # one H200: run AO, drafter trained for 8 steps
#   bash experiments/run_h200.sh gpu_pair_steps8_eq  # one H200: that drafter at run AO's step
#                                                  # count (run AW)
#   bash experiments/run_h200.sh gpu_pair_decay    # one H200: run AO with the rule's
#                                                  # position_decay=when_judged too (run AX)
#   bash experiments/run_h200.sh drafter_warps     # one H200: those kernels with 1 / 2 warps
#   bash experiments/run_h200.sh released_drafters # one H200: the released assistants' steps
#                                                  # without / with the kernels (run AN)
#   bash experiments/run_h200.sh kernels_first     # one H200: the kernels' GPU tests, round
#                                                  # probe and run AN's =on half in one command
#   bash experiments/run_h200.sh drafter_options   # one H200: the drafter step's options
#                                                  # (session 16, run AR) against run AQ's step
#   bash experiments/run_h200.sh drafter_options2  # one H200: run AR's winners as defaults,
#                                                  # longer loops; benchmark drafter part (AT)
#   bash experiments/run_h200.sh drafter_options3  # one H200: top-k in two passes, combine
#                                                  # kernel for every layer (run AU)
#   bash experiments/run_h200.sh drafter_warps_probe  # one H200: the drafter kernels with 1 / 2
#                                                  # warps per program (run AY)
#   bash experiments/run_h200.sh drafter_warps8_probe  # one H200: the drafter kernels with 8
#                                                  # warps per program (run AZ)
#   bash experiments/run_h200.sh decode_attention  # one H200: the one-position attention
#                                                  # kernels, tests on the GPU, step (run BA)
#   bash experiments/run_h200.sh decode_attention2  # one H200: run BA again after the in-place
#                                                  # stores; batch 8, 8k context (run BC)
#   bash experiments/run_h200.sh decode_attention3  # one H200: GPU tests, batch 2 / 4 (run BD)
#   bash experiments/run_h200.sh decode_attention_big  # one H200: 31B; 26B-A4B, 31B at 8k (BE, BF)
#   bash experiments/run_h200.sh decode_attention_bench  # one H200: benchmark decode (run BB)
#   bash experiments/run_h200.sh decode_attention_ranges  # one GPU: chunks a program (run BG)
#   bash experiments/run_h200.sh ranges_batch4     # one GPU: one chunk a range at batch 4 (BV)
#   bash experiments/run_h200.sh moe_router        # one GPU: the MoE router's kernels (BW)
#   bash experiments/run_h200.sh ple_kernels       # one H200: the PLE layers' end as kernels (BH)
#   bash experiments/run_h200.sh ple_kernels2      # one H200: run BH again, the gate split (BJ)
#   bash experiments/run_h200.sh ple_kernels3      # one H200: the o projection's tiles (BK)
#   bash experiments/run_h200.sh ple_kernels4      # one H200: the PLE kernels as kept (BL)
#   bash experiments/run_h200.sh ple_verify        # one H200: PLE kernels in verification (BM)
#   bash experiments/run_h200.sh kernels_bench     # one H200: benchmark decode, all kernels (BI)
#   bash experiments/run_h200.sh kernels_bench_all # one H200: E4B, E2B, 26B-A4B, all parts (CJ)
#   bash experiments/run_h200.sh ple_verify5       # one GPU: PLE kernels at 5 positions (CO)
#   bash experiments/run_h200.sh moe_shared_rows   # one GPU: routed experts on shared rows (CQ)
#   bash experiments/run_h200.sh moe_shared        # one GPU: CQ and the shared MLP as experts (CR)
#   bash experiments/run_h200.sh fold_splits       # one GPU: the top k by rank (CS)
#   bash experiments/run_h200.sh short_kernels     # one GPU: ROUTER_END, BLOCK_NORMS (CT)
#   bash experiments/run_h200.sh gpu_pair_full     # one GPU: the pair on full budgets (CK), then
#   bash experiments/run_h200.sh gpu_pair_full_eval  # its speeds in fresh processes (CK2)
#   bash experiments/run_h200.sh verify_attention  # one GPU: attention kernels in verification (BO)
#   bash experiments/run_h200.sh verify_ple        # one GPU: E4B verification, PLE kernels (BP)
#   bash experiments/run_h200.sh verify_others     # one GPU: 31B, 26B-A4B, E2B verification (BQ-BS)
#   bash experiments/run_h200.sh drafter_final     # one H200: COMBINE as kept, released and
#                                                  # GPU-pair drafters; benchmark part (AV)
set -u
OUT=${OUT:-runs/h200}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.94
BENCH=${BENCH:-experiments/results/benchmark_h200.json}

# pair_round_probe NAME XLA_FLAGS [ARGS...]: round_probe.py on random weights of the GPU pair's
# shapes, K = 8; record $OUT/round_probe_NAME_h200.json, log $OUT/round_probe_NAME.log.
pair_round_probe() {
  local name=$1 flags=$2
  shift 2
  XLA_FLAGS="$flags" timeout 150 python experiments/round_probe.py --shapes=gpu_pair --fixed=8 \
      "$@" --out="$OUT/round_probe_${name}_h200.json" > "$OUT/round_probe_$name.log" 2>&1
  grep -E "^(plain|K=|adaptive)" "$OUT/round_probe_$name.log"
}

# gpu_pair_run NAME PROMPTS [FLAGS...]: configs/reproduce_gpu.py trimmed (one convention, no full
# evaluation, no batch-8 speeds) with PROMPTS batch-1 workload prompts and any further config
# FLAGS; records $OUT/reproduce_NAME_h200.json and ..._metrics.jsonl, log $OUT/reproduce.log.
gpu_pair_run() {
  local name=$1 prompts=$2
  shift 2
  timeout 590 python experiments/reproduce_gpu.py --config=configs/reproduce_gpu.py \
      --config.out_dir=runs/gpu --config.full_eval=False --config.measure_speed=False \
      "--config.conventions=('hf',)" --config.workload_prompts="$prompts" "$@" \
      > "$OUT/reproduce.log" 2>&1
  cp runs/gpu/reproduce.json "$OUT/reproduce_${name}_h200.json"
  cat runs/gpu/target_metrics.jsonl runs/gpu/drafter_metrics.jsonl \
      > "$OUT/reproduce_${name}_h200_metrics.jsonl"
}

# gpu_pair_fresh_eval I SECONDS: the GPU pair in runs/gpu/demo timed by a fresh evaluate.py:
# plain, K = 4 and 8, adaptive, on held-out code, prose and the mixed workload, batch 1 greedy,
# 8 prompts, calibrated round costs, 3 passes; record $OUT/evaluate_gpu_pair_freshI_h200.json.
gpu_pair_fresh_eval() {
  timeout "$2" python experiments/evaluate.py \
      --target=runs/gpu/demo/target --drafter=runs/gpu/demo/drafter \
      --tokenizer=runs/gpu/demo/tokenizer.model --workload_prompts=8 --temperatures= \
      --draft_lengths=4,8 --verify_costs=1,1 --calibrate --workload_repeats=3 \
      --out="$OUT/evaluate_gpu_pair_fresh$1_h200.json" > "$OUT/evaluate_gpu_pair_fresh$1.log" 2>&1
  grep -hE "workload (code|prose|mixed)" "$OUT/evaluate_gpu_pair_fresh$1.log" | cut -c1-160
}

case "${1:-}" in
  train_and_bench)
    (CUDA_VISIBLE_DEVICES=0 timeout 575 python experiments/reproduce_gpu.py \
        --config=configs/reproduce_gpu.py --config.out_dir=runs/gpu > "$OUT/reproduce.log" 2>&1
     cp runs/gpu/reproduce.json "$OUT/reproduce_gpu_h200.json"
     cat runs/gpu/target_metrics.jsonl runs/gpu/drafter_metrics.jsonl > "$OUT/gpu_metrics.jsonl") &
    (CUDA_VISIBLE_DEVICES=1 timeout 575 python experiments/benchmark.py --deadline_s=500 \
        --parts=copy,decode,verify,drafter,predict,e2e --e2e_models=gemma4_e2b \
        --verify_models=gemma4_e4b,gemma4_31b --out="$OUT/benchmark_h200.json" \
        > "$OUT/benchmark.log" 2>&1) &
    wait
    ;;
  tp_hf_domain)
    timeout 280 python experiments/tp_decode.py --out="$OUT/tp_decode_31b_2xh200.json" \
        > "$OUT/tp_decode.log" 2>&1
    cp "$BENCH" "$OUT/benchmark_h200.json"
    (CUDA_VISIBLE_DEVICES=0 timeout 230 python experiments/benchmark.py --parts=hf --update \
        --out="$OUT/benchmark_h200.json" > "$OUT/benchmark_hf.log" 2>&1) &
    (CUDA_VISIBLE_DEVICES=1 timeout 230 python experiments/new_domain.py --steps=600 \
        --batch_size=32 --seq_len=512 --embed_dim=192 --prompts=32 --max_new_tokens=128 \
        --out="$OUT/new_domain_h200.json" > "$OUT/new_domain.log" 2>&1) &
    wait
    ;;
  variants_and_bench)
    cp "$BENCH" "$OUT/benchmark_h200.json"
    (CUDA_VISIBLE_DEVICES=0 timeout 560 python experiments/variants.py \
        --config=configs/variants_gpu.py --config.record="$OUT/variants_h200.json" \
        > "$OUT/variants.log" 2>&1) &
    (CUDA_VISIBLE_DEVICES=1 timeout 560 python experiments/benchmark.py --update \
        --deadline_s="${BENCH_DEADLINE:-520}" --models="${BENCH_MODELS:-gemma4_e2b,gemma4_e4b,gemma4_31b,gemma4_26b_a4b}" \
        --parts="${BENCH_PARTS:-copy,decode,verify,drafter,predict,int8,e2e}" --e2e_models=gemma4_e2b \
        --out="$OUT/benchmark_h200.json" > "$OUT/benchmark.log" 2>&1) &
    wait
    ;;
  fused_one_gpu)
    timeout 400 python experiments/step_probe.py --models=gemma4_e4b,gemma4_26b_a4b,gemma4_e2b \
        --out="$OUT/step_probe_h200.json" > "$OUT/step_probe.log" 2>&1
    timeout 280 python experiments/step_probe.py --models=gemma4_31b --variants=checkpoint,fused \
        --out="$OUT/step_probe_31b_h200.json" > "$OUT/step_probe_31b.log" 2>&1
    cp "$BENCH" "$OUT/benchmark_h200.json"
    timeout 575 python experiments/benchmark.py --update --deadline_s=530 \
        --models=gemma4_31b,gemma4_e4b,gemma4_e2b --parts=copy,decode,verify,drafter,predict,int8,e2e \
        --e2e_models=gemma4_e2b --out="$OUT/benchmark_h200.json" > "$OUT/benchmark.log" 2>&1
    timeout 190 python experiments/benchmark.py --update --deadline_s=170 --models=gemma4_26b_a4b \
        --parts=copy,decode --out="$OUT/benchmark_h200.json" > "$OUT/bench26.log" 2>&1
    timeout 200 python experiments/benchmark.py --update --deadline_s=190 --models=gemma4_e2b \
        --parts=copy,decode --short_steps=16 --long_steps=136 --out="$OUT/benchmark_h200.json" \
        > "$OUT/bench_e2b.log" 2>&1
    for n in 16 32; do
      timeout 330 python experiments/evaluate.py --workload_prompts=$n --temperatures= \
          --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --segment_rounds=1,4 \
          --out="$OUT/evaluate_demo_workloads_segments${n}_h200.json" > "$OUT/evaluate$n.log" 2>&1
    done
    ;;
  # Session 6 (runs U-AB): measured in the working tree committed as 51422b0, which also held
  # two changes removed afterwards for want of a gain: the batch-1 step on two equal rows
  # (`model.pairs_rows`, the step probe's `fused` vs `fused_unpaired`) and unrolled drafter
  # steps (run AB); runs V and W ran before that commit's switch change (the loop as in
  # 2bfb7f6). `git checkout 51422b0` to rerun them as they were.
  paired_probe)      # session 6, run U: the step on two equal rows, cuDNN attention; run V
    timeout 330 python experiments/step_probe.py --models=gemma4_e4b,gemma4_26b_a4b \
        --variants=fused,fused_unpaired,fused_cudnn --verify_models=gemma4_e4b \
        --hlo_dir=/tmp/hlo --out="$OUT/step_probe_paired_h200.json" > "$OUT/step_probe.log" 2>&1
    tar -czf "$OUT/hlo.tgz" -C /tmp hlo
    timeout 250 python experiments/evaluate.py --workload_prompts=16 --temperatures= \
        --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=5 \
        --out="$OUT/evaluate_demo_workloads_repeats_h200.json" > "$OUT/evaluate.log" 2>&1
    ;;
  adaptive_cmdbuf)   # session 6, run W: the adaptive loop with conditionals in command buffers
    XLA_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
      timeout 250 python experiments/evaluate.py --workload_prompts=16 --temperatures= \
        --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=5 \
        --out="$OUT/evaluate_demo_workloads_cmdbuf_h200.json" > "$OUT/evaluate_cmdbuf.log" 2>&1
    ;;
  switch_root)       # session 6, runs X, Y: the switch as the loop body's root; attention of
                     # the two-row step on one query
    timeout 300 python experiments/step_probe.py --models=gemma4_e4b,gemma4_26b_a4b,gemma4_e2b \
        --variants=fused,fused_unpaired --verify_models= \
        --out="$OUT/step_probe_paired2_h200.json" > "$OUT/step_probe2.log" 2>&1
    timeout 250 python experiments/evaluate.py --workload_prompts=16 --temperatures= \
        --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=5 \
        --out="$OUT/evaluate_demo_workloads_root_h200.json" > "$OUT/evaluate_root.log" 2>&1
    ;;
  conditional_cmdbuf)  # session 6, run Z: the switch as a CUDA-graph conditional; 32 prompts
    XLA_FLAGS="--xla_gpu_enable_command_buffer=+CONDITIONAL" \
      timeout 200 python experiments/evaluate.py --workload_prompts=16 --temperatures= \
        --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=5 \
        --out="$OUT/evaluate_demo_workloads_condcmd_h200.json" > "$OUT/evaluate_condcmd.log" 2>&1
    timeout 300 python experiments/evaluate.py --workload_prompts=32 --temperatures= \
        --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=5 \
        --out="$OUT/evaluate_demo_workloads_root32_h200.json" > "$OUT/evaluate_root32.log" 2>&1
    ;;
  unrolled_drafts)   # session 6, run AB: the drafter steps of a round unrolled
    timeout 120 python experiments/round_probe.py --out="$OUT/round_probe_unrolled_h200.json" \
        > "$OUT/round_probe.log" 2>&1
    timeout 250 python experiments/evaluate.py --workload_prompts=16 --temperatures= \
        --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=3 \
        --out="$OUT/evaluate_demo_workloads_unrolled_h200.json" > "$OUT/evaluate_unrolled.log" 2>&1
    ;;
  dispatch_compare)  # session 7, run AC: the adaptive rule's 'loops' dispatch (default) vs 'switch'
    for n in 16 32; do
      timeout 280 python experiments/evaluate.py --workload_prompts=$n --temperatures= \
          --draft_lengths=2,4,8 --verify_costs=1,1,1 --calibrate --workload_repeats=5 \
          --dispatches=switch --out="$OUT/evaluate_demo_workloads_dispatch${n}_h200.json" \
          > "$OUT/evaluate_dispatch$n.log" 2>&1
    done
    ;;
  gpu_pair)          # session 9, run AJ: the GPU-trained pair on a 16-core host, its evaluation
                     # trimmed so that training and the interleaved, calibrated workloads (12
                     # prompts, three passes) fit one 10-minute command (569 s)
    gpu_pair_run gpu_pair 12
    ;;
  drafter_warps)     # session 10, next: the drafter kernels with 1 and 2 warps per program
                     # (4 in run AL): fewer warps, fewer barriers in their reductions
    pair_round_probe drafter_warps1 "" --adaptive=false --drafter_warps=1
    pair_round_probe drafter_warps2 "" --adaptive=false --drafter_warps=2
    ;;
  gpu_pair_kernels)  # session 10, run AM: run AJ again with the drafter step as Pallas kernels
                     # (on by default on one GPU); 10 workload prompts instead of 12, to leave
                     # room in the 10 minutes for the kernels' compilation
    gpu_pair_run gpu_pair_kernels 10
    ;;
  gpu_pair_warm)     # session 15, run AO: run AM again, its workloads now with 'adaptive, warm'
                     # and outputs_equal_plain; 16 acceptance prompts instead of 32 (~25 s) to
                     # leave room for the extra configuration in the 10 minutes
    gpu_pair_run gpu_pair_warm 10 --config.eval_prompts=16
    grep -E "workload|done in" "$OUT/reproduce.log" | cut -c1-200 | tail -25
    ;;
  gpu_pair_steps8)   # session 16, run AS (H100): run AO with the drafter trained to unroll
                     # 8 steps (runs AM-AP: K = 8 the best bucket everywhere, trained for 4)
    gpu_pair_run gpu_pair_steps8 10 --config.eval_prompts=16 --config.drafter_steps=8 \
        "--config.drafter_step_weights=(1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3)"
    grep -E "workload|done in" "$OUT/reproduce.log" | cut -c1-200 | tail -25
    ;;
  gpu_pair_steps8_eq)  # session 17, run AW: run AS with the drafter trained for as many steps
                     # as run AO's 4-step drafter (~730): a 130 s drafter budget instead of 75 s
    gpu_pair_run gpu_pair_steps8_eq 10 --config.eval_prompts=16 --config.drafter_steps=8 \
        "--config.drafter_step_weights=(1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3)" \
        --config.drafter_seconds=130
    grep -E "workload|done in" "$OUT/reproduce.log" | cut -c1-200 | tail -25
    ;;
  gpu_pair_decay)    # session 17, run AX: run AO (the 4-step drafter) with the adaptive rule's
                     # position_decay=when_judged beside the default, cold and warm; trained
                     # shorter (110 s + 55 s, 8 acceptance prompts) to fit what was left of the
                     # session's device time
    gpu_pair_run gpu_pair_decay 10 --config.eval_prompts=8 --config.target_seconds=100 \
        --config.drafter_seconds=55 \
        "--config.workload_rule_variants=('position_decay=when_judged',)"
    grep -E "workload|done in" "$OUT/reproduce.log" | cut -c1-200 | tail -31
    ;;
  gpu_pair_k16)      # session 15, run AP: run AO with buckets 2, 4, 8, 16 (K = 1 was never
                     # chosen in runs AM, AO; K = 8 was the best fixed length everywhere) and
                     # each greedy configuration's divergences from plain decoding
    gpu_pair_run gpu_pair_k16 10 --config.eval_prompts=16 "--config.buckets=(2,4,8,16)"
    grep -E "workload|done in" "$OUT/reproduce.log" | cut -c1-200 | tail -25
    ;;
  loop_graphs)       # session 9, run AH: a GPU-pair-shaped round (random weights) and plain step
                     # with XLA's default command buffers, with whole loops as CUDA graphs
                     # (WHILE: no host round trip per iteration), with conditionals too, and off
    pair_round_probe shapes_default ""
    pair_round_probe shapes_while "--xla_gpu_enable_command_buffer=+WHILE"
    pair_round_probe shapes_while_cond "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"
    pair_round_probe shapes_off "--xla_gpu_enable_command_buffer="
    ;;
  pair_layouts)      # session 9, run AI: the rounds of run AH in the checkpoint layout, in the
                     # fused one (target and drafter), its one-row matmuls padded with a copy of
                     # the row instead of zeros, and its small weights left unpadded
    pair_round_probe layout_checkpoint "" --adaptive=false
    pair_round_probe layout_fused "" --adaptive=false --fused
    pair_round_probe layout_fused_copy "" --adaptive=false --fused --pad_rows=copy
    pair_round_probe layout_fused_min1m "" --adaptive=false --fused --pad_min_weight_size=1048576
    ;;
  drafter_kernels)   # session 10, run AL: the drafter step as Pallas kernels (drafter_kernels.py):
                     # its tests compiled for the GPU, then the GPU pair's K = 8 round without
                     # and with them
    timeout 260 python -m pytest tests/test_drafter_kernels.py -q -p no:cacheprovider \
        > "$OUT/drafter_kernels_tests.log" 2>&1
    tail -3 "$OUT/drafter_kernels_tests.log"
    GEMMA_MTP_DRAFTER_KERNELS=off pair_round_probe drafter_xla "" --adaptive=false
    pair_round_probe drafter_kernels "" --adaptive=false
    ;;
  released_drafters) # session 11, run AN: each released assistant's step relative to its target's
                     # step (the benchmark's drafter part), with the XLA step and with the drafter
                     # kernels (=on: under auto only the 256-wide E2B / E4B ones take them)
    for mode in off on; do
      GEMMA_MTP_DRAFTER_KERNELS=$mode timeout 290 python experiments/benchmark.py \
          --parts=copy,drafter --copy_mb=1024 --contexts=1024 --deadline_s=250 --plot=false \
          --out="$OUT/benchmark_drafters_${mode}_h200.json" > "$OUT/benchmark_drafters_$mode.log" 2>&1
      grep -E "drafter" "$OUT/benchmark_drafters_$mode.log" | tail -4
    done
    ;;
  kernels_first)     # session 12: the session-11 kernels compiled by Triton first (their GPU
                     # tests, run AL's K = 8 round probe), then run AN's =on half; one command
    timeout 150 python -m pytest tests/test_drafter_kernels.py -q -x -p no:cacheprovider \
        > "$OUT/drafter_kernels_tests.log" 2>&1
    tail -3 "$OUT/drafter_kernels_tests.log"
    XLA_FLAGS= timeout 100 python experiments/round_probe.py --shapes=gpu_pair --fixed=8 \
        --adaptive=false --out="$OUT/round_probe_drafter_kernels_v4_h200.json" \
        > "$OUT/round_probe_drafter_kernels_v4.log" 2>&1
    grep -E "^(plain|K=|adaptive)" "$OUT/round_probe_drafter_kernels_v4.log"
    GEMMA_MTP_DRAFTER_KERNELS=on timeout 240 python experiments/benchmark.py \
        --parts=copy,drafter --copy_mb=1024 --contexts=1024 --deadline_s=200 --plot=false \
        --out="$OUT/benchmark_drafters_on_h200.json" > "$OUT/benchmark_drafters_on.log" 2>&1
    grep -E "drafter" "$OUT/benchmark_drafters_on.log" | tail -4
    ;;
  drafter_options)   # session 16, run AR: the kernels' tests compiled by Triton (the combine
                     # kernel's first), then the released E2B / E4B assistants' steps with each
                     # option (~3 minutes). Run AR ran at commit 6966310, before COMBINE was on
                     # by default, under the variant names of then (full_row, base, combine =
                     # run_aq, no_combine, base now; its top_k128, top_k256 and all variants set
                     # drafter.TOP_K_CHUNK, removed after run AT)
    timeout 200 python -m pytest tests/test_drafter_kernels.py -q -x -p no:cacheprovider \
        > "$OUT/drafter_kernels_tests.log" 2>&1
    tail -3 "$OUT/drafter_kernels_tests.log"
    timeout 360 python experiments/drafter_probe.py --modes=on \
        --variants=run_aq,no_combine,base \
        --out="$OUT/drafter_probe_options_h200.json" > "$OUT/drafter_probe_options.log" 2>&1
    grep -E "us/step" "$OUT/drafter_probe_options.log"
    ;;
  drafter_options2)  # session 16, run AT (at commit 2581731, also with --variants=top_k128:
                     # drafter.TOP_K_CHUNK, removed after it): run AR's winners as defaults,
                     # against the step of run AQ, with longer timing loops; then the benchmark's
                     # drafter part (each released assistant's step relative to its target's)
    timeout 250 python experiments/drafter_probe.py --modes=on --short=8 --long=72 \
        --variants=run_aq,full_row,no_combine,base \
        --out="$OUT/drafter_probe_defaults_h200.json" > "$OUT/drafter_probe_defaults.log" 2>&1
    grep -E "us/step" "$OUT/drafter_probe_defaults.log"
    timeout 300 python experiments/benchmark.py --parts=copy,drafter --copy_mb=1024 \
        --contexts=1024 --deadline_s=240 --plot=false \
        --out="$OUT/benchmark_drafters_combine_h200.json" > "$OUT/benchmark_drafters.log" 2>&1
    grep -E "drafter" "$OUT/benchmark_drafters.log" | tail -4
    ;;
  drafter_options3)  # session 16, run AU, at commit 2581731 (its TOP_K_PASSES and COMBINE_ALL
                     # options were removed after it): the centroid head's top 32 in two passes
                     # of 16 (XLA's GPU TopK kernel) and the combine kernel for every layer
    timeout 200 python -m pytest tests/test_drafter.py tests/test_drafter_kernels.py -q \
        -p no:cacheprovider -k "chunked_top_k or greedy_candidate or combined" \
        > "$OUT/drafter_options3_tests.log" 2>&1
    tail -15 "$OUT/drafter_options3_tests.log"
    timeout 300 python experiments/drafter_probe.py --modes=on --short=8 --long=72 \
        --variants=base,top_k_passes2,combine_all,passes2_combine_all \
        --out="$OUT/drafter_probe_passes_h200.json" > "$OUT/drafter_probe_passes.log" 2>&1
    grep -E "us/step" "$OUT/drafter_probe_passes.log"
    ;;
  drafter_warps_probe)  # session 17, run AY: the drafter kernels with 1 and 2 warps per
                     # program against the default 4, in drafter_probe (kernel time a step)
    timeout 200 python experiments/drafter_probe.py --modes=on --short=8 --long=72 \
        --models=gemma4_e2b,gemma4_e4b,gpu_pair --variants=base,warps1,warps2 \
        --out="$OUT/drafter_probe_warps_h200.json" > "$OUT/drafter_probe_warps.log" 2>&1
    grep -E "us/step" "$OUT/drafter_probe_warps.log"
    ;;
  drafter_warps8_probe)  # session 18, run AZ: run AY's probe with 8 warps per program (run AY:
                     # 1 and 2 warps slower than 4, so the kernels wait on loads in flight)
    timeout 200 python experiments/drafter_probe.py --modes=on --short=8 --long=72 \
        --models=gemma4_e2b,gemma4_e4b,gpu_pair --variants=base,warps8 \
        --out="$OUT/drafter_probe_warps8_h200.json" > "$OUT/drafter_probe_warps8.log" 2>&1
    grep -E "us/step" "$OUT/drafter_probe_warps8.log"
    ;;
  decode_attention)  # session 19, run BA (at commit c7410c2; the code since then is run BC's):
                     # the one-position attention as two Pallas kernels a layer
                     # (decode_attention): its tests and the drafter kernels' compiled by Triton
                     # (170 s was too short on an H100: 4 passed), then the batch-1 step with and
                     # without them
    timeout 170 python -m pytest -q -x tests/test_decode_attention.py tests/test_drafter_kernels.py \
        > "$OUT/tests_gpu.log" 2>&1; tail -3 "$OUT/tests_gpu.log"
    timeout 400 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b \
        --variants=fused,fused_attn_off --verify_models=gemma4_e4b \
        --out="$OUT/step_probe_attn_h200.json" > "$OUT/step_probe_attn.log" 2>&1
    grep -E " ms " "$OUT/step_probe_attn.log"
    ;;
  decode_attention2)  # session 19, run BC: run BA after the kernel stores the token's key and
                     # value in place and reads the q|k|v projection's padded rows; also batch 8
                     # and an 8k context (no profile)
    timeout 200 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b \
        --variants=fused,fused_attn_off --verify_models= \
        --out="$OUT/step_probe_attn2_h200.json" > "$OUT/step_probe_attn2.log" 2>&1
    timeout 130 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b --batch=8 \
        --variants=fused,fused_attn_off --verify_models=gemma4_e4b --profile_steps=0 \
        --out="$OUT/step_probe_attn2_b8_h200.json" > "$OUT/step_probe_attn2_b8.log" 2>&1
    timeout 130 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b --context=8192 \
        --variants=fused,fused_attn_off --verify_models= --profile_steps=0 \
        --out="$OUT/step_probe_attn2_8k_h200.json" > "$OUT/step_probe_attn2_8k.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_attn2*.log
    ;;
  decode_attention3)  # session 19, run BD: the kernels' tests on the GPU after the in-place
                     # stores; batch 2 and 4 with and without the kernels (run BC: batch 8 slower)
    timeout 240 python -m pytest -q -x tests/test_decode_attention.py \
        -k "tiny or k_eq_v or padded or bfloat16 or one" > "$OUT/tests_gpu.log" 2>&1
    tail -3 "$OUT/tests_gpu.log"
    for b in 2 4; do
      timeout 90 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b --batch=$b \
          --variants=fused_attn_on,fused_attn_off --verify_models= --profile_steps=0 \
          --out="$OUT/step_probe_attn3_b${b}_h200.json" > "$OUT/step_probe_attn3_b$b.log" 2>&1
    done
    grep -hE " ms " "$OUT"/step_probe_attn3*.log
    ;;
  decode_attention_big)  # session 19, runs BE and BF (sent as two commands): 31B at 1k, and
                     # 26B-A4B and 31B at 8k, with and without the kernels
    timeout 235 python experiments/step_probe.py --models=gemma4_31b \
        --variants=fused_attn_on,fused_attn_off --verify_models= --profile_steps=0 --short=8 \
        --long=32 --out="$OUT/step_probe_attn4_31b_h200.json" > "$OUT/step_probe_attn4_31b.log" 2>&1
    timeout 170 python experiments/step_probe.py --models=gemma4_26b_a4b,gemma4_31b --context=8192 \
        --variants=fused_attn_on,fused_attn_off --verify_models= --profile_steps=0 --short=8 \
        --long=32 --out="$OUT/step_probe_attn5_8k_h200.json" > "$OUT/step_probe_attn5_8k.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_attn[45]*.log
    ;;
  decode_attention_ranges)  # session 19, run BG (run in session 22, on an H100): the attention
                     # kernel's programs reading ~1 / 2 / 4 cache chunks each (E4B's kernel 5.2
                     # us a sliding layer in run BC: 64 programs of 2 chunks on 132 SMs; one
                     # chunk is the library's since; run BG's `fused` was 2)
    timeout 300 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b \
        --variants=fused_attn_range2,fused_attn_range1,fused_attn_range4 --verify_models= \
        --out="$OUT/step_probe_attn_ranges_h200.json" > "$OUT/step_probe_attn_ranges.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_attn_ranges.log"
    ;;
  ranges_batch4)     # session 22, run BV: one chunk a range (the library's) against two at
                     # batch 4, after the kernels' tests compiled by Triton (run trimmed, ad
                     # hoc: E4B's step only, no attention tests; NOTES)
    timeout 160 python -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
        -k "float32 or bfloat16" > "$OUT/decode_attention_tests.log" 2>&1
    tail -3 "$OUT/decode_attention_tests.log"
    timeout 200 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b --batch=4 \
        --verify_models= --variants=fused,fused_attn_range2 --profile_steps=0 \
        --out="$OUT/step_probe_attn_ranges_b4_h200.json" > "$OUT/step_probe_attn_ranges_b4.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_attn_ranges_b4.log"
    ;;
  moe_router)        # session 22, run BW: the MoE router as two Pallas kernels (moe_kernels):
                     # their tests compiled by Triton, then 26B-A4B's decode step and 5-position
                     # verification with and without them (batch 1), and its batch-8 step
    timeout 120 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        > "$OUT/moe_kernels_tests.log" 2>&1
    tail -3 "$OUT/moe_kernels_tests.log"
    timeout 220 python experiments/step_probe.py --models=gemma4_26b_a4b \
        --verify_models=gemma4_26b_a4b --variants=fused,fused_moe_off --profile_steps=0 \
        --short=8 --long=32 --out="$OUT/step_probe_moe_h200.json" > "$OUT/step_probe_moe.log" 2>&1
    timeout 150 python experiments/step_probe.py --models=gemma4_26b_a4b --batch=8 \
        --verify_models= --variants=fused_moe_on,fused_moe_off --profile_steps=0 --short=8 \
        --long=32 --out="$OUT/step_probe_moe_b8_h200.json" >> "$OUT/step_probe_moe.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_moe.log"
    ;;
  moe_finish)        # session 23, run BX: the MoE layer's end after the experts as one Pallas
                     # kernel (moe_kernels.tail): the MoE kernels' tests compiled by Triton, then
                     # 26B-A4B's decode step and 5-position verification with and without it
                     # (the router kernels on in both; batch 1), and its batch-8 step (at
                     # commit 911774e, where `fused` ran the kernel up to 8 tokens; since then
                     # `fused_moe_on` does, `moe_kernels.FINISH_MAX_TOKENS`)
    timeout 180 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        > "$OUT/moe_finish_tests.log" 2>&1
    tail -3 "$OUT/moe_finish_tests.log"
    timeout 220 python experiments/step_probe.py --models=gemma4_26b_a4b \
        --verify_models=gemma4_26b_a4b --variants=fused,fused_moe_finish_off --profile_steps=0 \
        --short=8 --long=32 --out="$OUT/step_probe_finish_moe_h200.json" \
        > "$OUT/step_probe_finish.log" 2>&1
    timeout 150 python experiments/step_probe.py --models=gemma4_26b_a4b --batch=8 \
        --verify_models= --variants=fused,fused_moe_finish_off --profile_steps=0 --short=8 \
        --long=32 --out="$OUT/step_probe_finish_moe_b8_h200.json" \
        >> "$OUT/step_probe_finish.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_finish.log"
    ;;
  moe_finish2)       # session 23, run BY: run BX after the finish kernel takes one block
                     # reduction a norm (run BX: one a 256-wide chunk, 44 a row; the kernel
                     # 7.5 us) and reads each expert's weight as a scalar (fused_moe_on: the
                     # finish kernel at every case here); and E4B with every kernel's norms so
                     # (variant fused_rms1)
    timeout 120 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        -k "decode_steps or bfloat16" > "$OUT/moe_finish2_tests.log" 2>&1
    tail -3 "$OUT/moe_finish2_tests.log"
    timeout 170 python experiments/step_probe.py --models=gemma4_26b_a4b \
        --verify_models=gemma4_26b_a4b --variants=fused_moe_on,fused_moe_finish_off \
        --profile_steps=0 --short=8 --long=32 --out="$OUT/step_probe_finish2_moe_h200.json" \
        > "$OUT/step_probe_finish2.log" 2>&1
    timeout 100 python experiments/step_probe.py --models=gemma4_26b_a4b --batch=8 \
        --verify_models= --variants=fused_moe_on,fused_moe_finish_off --profile_steps=0 \
        --short=8 --long=32 --out="$OUT/step_probe_finish2_moe_b8_h200.json" \
        >> "$OUT/step_probe_finish2.log" 2>&1
    timeout 100 python experiments/step_probe.py --models=gemma4_e4b --verify_models= \
        --variants=fused,fused_rms1 --profile_steps=0 --short=8 --long=32 \
        --out="$OUT/step_probe_rms1_e4b_h200.json" >> "$OUT/step_probe_finish2.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_finish2.log"
    ;;
  moe_finish_check)  # session 23, run BZ (not run: no device time left): the MoE kernels'
                     # remaining tests compiled by Triton (greedy plain, chain and tree decoding
                     # through them; the lowering), and a profile of run BY's finish kernel at
                     # batch 1 (its own time; run BX's form took 7.5 us)
    timeout 200 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        -k "generate or lower or finishes" > "$OUT/moe_finish_check_tests.log" 2>&1
    tail -3 "$OUT/moe_finish_check_tests.log"
    timeout 150 python experiments/step_probe.py --models=gemma4_26b_a4b --verify_models= \
        --variants=fused_moe_on,fused_moe_finish_off --profile_steps=2 --short=8 --long=32 \
        --trace_dir=/tmp/trace_bz --out="$OUT/step_profile_finish2_moe_h200.json" \
        > "$OUT/step_profile_finish2.log" 2>&1
    grep -hE " ms " "$OUT/step_profile_finish2.log"
    ;;
  decode_attention_bench)  # session 19, run BB (not run yet): the H200 record's decode figures
                     # of E4B, E2B and 26B-A4B with the kernels (an H200 only: the record is one)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200"; exit 3; }
    cp "$BENCH" "$OUT/benchmark_h200.json"
    timeout 560 python experiments/benchmark.py --update --deadline_s=520 \
        --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b --parts=copy,decode \
        --out="$OUT/benchmark_h200.json" > "$OUT/benchmark_attn.log" 2>&1
    tail -30 "$OUT/benchmark_attn.log"
    ;;
  ple_kernels)       # session 20, run BH: the end of each PLE layer as three Pallas kernels
                     # (ple_kernels): its tests compiled by Triton, then E4B's and E2B's step with
                     # both kinds of kernel, without the PLE ones, and with neither; batch 4
    timeout 150 python -m pytest -q -x tests/test_ple_kernels.py \
        -k "batch or bfloat or one" > "$OUT/tests_gpu.log" 2>&1   # (150 s: 2 passed, cut)
    tail -3 "$OUT/tests_gpu.log"
    timeout 260 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b \
        --variants=fused,fused_ple_off,fused_xla --verify_models= \
        --out="$OUT/step_probe_ple_h200.json" > "$OUT/step_probe_ple.log" 2>&1
    timeout 100 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b --batch=4 \
        --variants=fused,fused_ple_off --verify_models= --profile_steps=0 \
        --out="$OUT/step_probe_ple_b4_h200.json" > "$OUT/step_probe_ple_b4.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_ple*.log
    ;;
  ple_kernels2)      # session 20, run BJ: run BH after the proj kernel reads its layer's slice
                     # of the per-layer inputs itself (run BH: a copy kernel a layer), and with
                     # the o projection and the norms after it as two kernels more
                     # (ple_kernels.attention_end) or not; the gate kernel in twice as many
                     # parts; then the tests compiled by Triton
    timeout 300 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b \
        --variants=fused,fused_ple_xla_o,fused_ple_off,fused_ple_split2 --verify_models= \
        --out="$OUT/step_probe_ple2_h200.json" > "$OUT/step_probe_ple2.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_ple2.log
    timeout 200 python -m pytest -q -x tests/test_ple_kernels.py \
        -k "batch or bfloat or one" > "$OUT/tests_gpu.log" 2>&1
    tail -3 "$OUT/tests_gpu.log"
    ;;
  ple_kernels3)      # session 20, run BK: the o projection of ple_kernels.attention_end as
                     # column tiles of 32 / 64 / 128 (run BJ: the drafter's o kernel, 16 columns,
                     # ran E4B's o weight at ~1 TB/s), against XLA's o projection; the gate in 2
                     # parts (run BJ's winner); then the tests compiled by Triton
    timeout 330 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b \
        --variants=fused,fused_o32,fused_o128,fused_ple_xla_o,fused_ple_off --verify_models= \
        --out="$OUT/step_probe_ple3_h200.json" > "$OUT/step_probe_ple3.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_ple3.log
    timeout 150 python -m pytest -q -x tests/test_ple_kernels.py \
        -k "batch or split" > "$OUT/tests_gpu.log" 2>&1
    tail -3 "$OUT/tests_gpu.log"
    ;;
  ple_kernels4)      # session 20, run BL: the library's PLE kernels as kept after runs BH-BK
                     # (three kernels a layer, the gate in 2 parts): E4B and E2B with both
                     # kinds of kernel, the attention kernels only, and neither; batch 4
    timeout 200 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b \
        --variants=fused,fused_ple_off,fused_xla --verify_models= \
        --out="$OUT/step_probe_ple4_h200.json" > "$OUT/step_probe_ple4.log" 2>&1
    timeout 100 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b --batch=4 \
        --variants=fused,fused_ple_off --verify_models= --profile_steps=0 \
        --out="$OUT/step_probe_ple4_b4_h200.json" > "$OUT/step_probe_ple4_b4.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_ple4*.log
    ;;
  ple_verify)        # session 20, run BM: the PLE kernels in verification forwards (2-4
                     # positions a row at batch 1: the automatic switch's limit), E4B, against
                     # the same forwards without them
    timeout 150 python experiments/step_probe.py --models=gemma4_e4b --verify_models=gemma4_e4b \
        --verify_positions=2,3,4 --variants=fused,fused_ple_off --profile_steps=0 --short=8 \
        --long=32 --out="$OUT/step_probe_ple_verify_h200.json" > "$OUT/step_probe_ple_verify.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_ple_verify.log
    ;;
  verify_attention)  # session 21, runs BN, BO: the attention kernels in verification forwards
                     # (2-16 positions a row) of E4B at batch 1, against XLA's attention; the
                     # kernels' verification tests compiled by Triton first
    timeout 150 python -m pytest tests/test_decode_attention.py -q -x -p no:cacheprovider \
        -k "verification" > "$OUT/verify_attention_tests.log" 2>&1
    tail -3 "$OUT/verify_attention_tests.log"
    timeout 400 python experiments/step_probe.py --models=gemma4_e4b \
        --verify_models=gemma4_e4b --verify_positions=2,3,5,9,16 \
        --variants=fused_attn_on,fused_attn_off --profile_steps=0 --short=8 --long=32 \
        --out="$OUT/step_probe_verify_attn_h200.json" > "$OUT/step_probe_verify_attn.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_verify_attn.log
    ;;
  verify_ple)        # session 21, run BP: E4B's verification forwards (4, 5, 9 positions) as the
                     # library runs them (attention kernels up to 9 positions, PLE kernels up to
                     # 4) against both kinds of kernel at any count
    timeout 400 python experiments/step_probe.py --models=gemma4_e4b \
        --verify_models=gemma4_e4b --verify_positions=4,5,9 \
        --variants=fused,fused_all_on --profile_steps=0 --short=8 --long=32 \
        --out="$OUT/step_probe_verify_ple_h200.json" > "$OUT/step_probe_verify_ple.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_verify_ple.log
    ;;
  verify_others)     # session 21, runs BQ, BR, BS: 5-position verifications and decode steps of
                     # 31B (the library's switch, which took several positions at any head
                     # count then, against XLA's attention), 26B-A4B and E2B (=on against off)
    for m in "gemma4_31b 5 fused,fused_attn_off 31b" "gemma4_26b_a4b 5 fused_attn_on,fused_attn_off 26b" \
             "gemma4_e2b 2,5,9 fused_attn_on,fused_attn_off e2b"; do
      set -- $m
      timeout 300 python experiments/step_probe.py --models=$1 --verify_models=$1 \
          --verify_positions=$2 --variants=$3 --profile_steps=0 --short=8 --long=32 \
          --out="$OUT/step_probe_verify_$4_h200.json" > "$OUT/step_probe_verify_$4.log" 2>&1
      grep -hE " ms " "$OUT/step_probe_verify_$4.log"
    done
    ;;
  kernels_bench)     # session 20, run BI: the H200 record's decode figures of E4B, E2B and
                     # 26B-A4B with the attention, PLE and MoE kernels (an H200 only: the record
                     # is one)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200"; exit 3; }
    cp "$BENCH" "$OUT/benchmark_h200.json"
    timeout 560 python experiments/benchmark.py --update --deadline_s=520 \
        --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b --parts=copy,decode \
        --out="$OUT/benchmark_h200.json" > "$OUT/benchmark_kernels.log" 2>&1
    tail -30 "$OUT/benchmark_kernels.log"
    ;;
  kernels_bench_full)  # session 24, run CA: run BI's E4B and E2B again with verification,
                     # drafter steps and predicted speedups, so that the record's ratios to one
                     # decode step are measured against the step with the kernels (an H200 only)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200"; exit 3; }
    cp "$BENCH" "$OUT/benchmark_h200.json"
    timeout 560 python experiments/benchmark.py --update --deadline_s=520 \
        --models=gemma4_e4b,gemma4_e2b --parts=copy,decode,verify,drafter,predict \
        --out="$OUT/benchmark_h200.json" > "$OUT/benchmark_kernels_full.log" 2>&1
    tail -40 "$OUT/benchmark_kernels_full.log"
    ;;
  verify_profile)    # session 24, run CC: E4B's decode step and 5-position verification
                     # profiled in one process (run CA: 3.95 ms against 3.50, 1.13x; where the
                     # verification's extra ~0.45 ms goes, kernel by kernel)
    timeout 230 python experiments/step_probe.py --models=gemma4_e4b --verify_models=gemma4_e4b \
        --variants=fused --profile_steps=2 --short=8 --long=32 --trace_dir=/tmp/trace_cc \
        --out="$OUT/step_profile_verify_e4b_h200.json" > "$OUT/step_profile_verify.log" 2>&1
    grep -hE " ms " "$OUT/step_profile_verify.log"
    ;;
  attention_own)     # session 24, run CD (run in session 25, on an H100): the forward's own tokens
                     # as a range of their own in the attention kernels (the variant
                     # fused_attn_own; the library's then had none) and 8 warps
                     # for the several-positions kernel (POSITIONS_WARPS), against the library:
                     # E4B's decode step and 5-position verification (run CC: owners' kernels
                     # 4.2 / 9 us at one position, 10.4 / 28 at five), then the tests compiled
                     # by Triton
    timeout 300 python experiments/step_probe.py --models=gemma4_e4b --verify_models=gemma4_e4b \
        --variants=fused,fused_attn_own,fused_attn_warps8,fused_attn_own_warps8 \
        --profile_steps=0 --short=8 --long=32 --out="$OUT/step_probe_own_h200.json" \
        > "$OUT/step_probe_own.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_own.log"
    timeout 200 python -m pytest -q -p no:cacheprovider tests/test_decode_attention.py \
        -k "own or True" > "$OUT/attention_own_tests.log" 2>&1
    tail -3 "$OUT/attention_own_tests.log"
    ;;
  gpu_pair_fresh)    # session 24, run CE: the GPU pair's "slow mode" (plain decoding
                     # ~0.66 ms a token in runs AJ, AP, AX2, AX3, CB against ~0.53 in AM, AE, AO,
                     # AX): the pair trained short, then its plain decoding and K = 8 rounds
                     # timed in three fresh processes, the last with XLA's GEMM autotuning off
                     # (a guess: the autotuner picks this small target's one-row GEMMs
                     # differently from process to process). Session 25's run CE was cut at
                     # 270 s in the drafter's training (data, tokenizer, two calibrations and
                     # compilations take ~125 s besides the budgets), so the budgets are shorter
                     # (session 26's run CE2, NOTES: both autotuned processes fast, 0.54 ms;
                     # autotuning off 1.25 ms: not the slow mode)
    timeout 300 python experiments/reproduce_gpu.py --config=configs/reproduce_gpu.py \
        --config.out_dir=runs/gpu --config.full_eval=False --config.measure_speed=False \
        "--config.conventions=('hf',)" --config.eval_prompts=8 --config.target_seconds=70 \
        --config.drafter_seconds=35 > "$OUT/reproduce_fresh.log" 2>&1
    tail -2 "$OUT/reproduce_fresh.log"
    for i in 1 2 3; do
      flags=""; [ "$i" = 3 ] && flags="--xla_gpu_autotune_level=0"
      XLA_FLAGS="$flags" timeout 90 python experiments/evaluate.py \
          --target=runs/gpu/demo/target --drafter=runs/gpu/demo/drafter \
          --tokenizer=runs/gpu/demo/tokenizer.model --workload_prompts=6 --temperatures= \
          --draft_lengths=8 --verify_costs=1 --calibrate --workload_repeats=3 \
          --out="$OUT/evaluate_fresh${i}_h200.json" > "$OUT/evaluate_fresh$i.log" 2>&1
      grep -hE "workload code (plain|K=8)" "$OUT/evaluate_fresh$i.log" | cut -c1-160
    done
    ;;
  moe_fold)          # session 25, run CG (session 26, on an H100; NOTES): the routed experts'
                     # MLP as two kernel calls (matvec.FOLD_EXPERT_FFN) measured +6.4% at batch 1
                     # and removed, so its variants are gone; this mode now measures the step
                     # from the o projection to the MLP's input as one kernel
                     # (ple_kernels.ATTENTION_END, the library's since run CG, CH and CH2)
                     # against XLA's ops: 26B-A4B at batch 1 (and a 5-position verification)
                     # and batch 8
    timeout 300 python experiments/step_probe.py --models=gemma4_26b_a4b \
        --verify_models=gemma4_26b_a4b --variants=fused_no_attn_end,fused --profile_steps=0 \
        --short=8 --long=32 --out="$OUT/step_probe_fold_moe_h200.json" \
        > "$OUT/step_probe_fold.log" 2>&1
    timeout 200 python experiments/step_probe.py --models=gemma4_26b_a4b --verify_models= \
        --batch=8 --variants=fused_no_attn_end,fused --profile_steps=0 --short=8 --long=32 \
        --out="$OUT/step_probe_fold_moe_b8_h200.json" >> "$OUT/step_probe_fold.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_fold.log"
    ;;
  attention_end)     # session 25, run CH (session 26, on an H100; NOTES): ple_kernels.ATTENTION_END
                     # in E4B and E2B (run CC's profile: ~6.5 us of XLA kernels a layer between
                     # the o GEMM and the gate|up GEMM on an H100) at batch 1, decode and
                     # 5-position verification, against XLA's ops, then its tests compiled by
                     # Triton
    timeout 280 python experiments/step_probe.py --models=gemma4_e4b,gemma4_e2b \
        --verify_models=gemma4_e4b,gemma4_e2b --variants=fused_no_attn_end,fused \
        --profile_steps=0 --short=8 --long=32 --out="$OUT/step_probe_attn_end_h200.json" \
        > "$OUT/step_probe_attn_end.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_attn_end.log"
    timeout 280 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        tests/test_ple_kernels.py -k "end or lower" > "$OUT/layer_folds_tests.log" 2>&1
    tail -3 "$OUT/layer_folds_tests.log"
    ;;
  drafter_final)     # session 16, run AV: COMBINE as kept (a combine kernel where an o program
                     # would take in a tile of partials): the kernels' tests compiled by Triton,
                     # the steps of the E2B / E4B assistants and of the GPU pair's drafter (1k and
                     # 4k caches) with and without it, then the benchmark's drafter part
                     # (SKIP_TESTS=1: without the tests, as run AV ran, ~3 minutes)
    if [ -z "${SKIP_TESTS:-}" ]; then
      timeout 200 python -m pytest tests/test_drafter_kernels.py -q -x -p no:cacheprovider \
          > "$OUT/drafter_kernels_tests.log" 2>&1
      tail -3 "$OUT/drafter_kernels_tests.log"
    fi
    timeout 200 python experiments/drafter_probe.py --modes=on --short=8 --long=72 \
        --models=gemma4_e2b,gemma4_e4b,gpu_pair --variants=run_aq,no_combine,base \
        --out="$OUT/drafter_probe_final_h200.json" > "$OUT/drafter_probe_final.log" 2>&1
    timeout 100 python experiments/drafter_probe.py --modes=on --short=8 --long=72 \
        --models=gpu_pair --variants=no_combine,base --context=4096 \
        --out="$OUT/drafter_probe_final_4k_h200.json" >> "$OUT/drafter_probe_final.log" 2>&1
    grep -E "us/step" "$OUT/drafter_probe_final.log"
    timeout 200 python experiments/benchmark.py --parts=copy,drafter --copy_mb=1024 \
        --contexts=1024 --deadline_s=160 --plot=false \
        --out="$OUT/benchmark_drafters_final_h200.json" > "$OUT/benchmark_drafters.log" 2>&1
    grep -E "drafter:" "$OUT/benchmark_drafters.log" | tail -4
    ;;
  kernels_bench_all)  # session 27, run CJ: the H200 record's E4B, E2B and 26B-A4B figures
                     # (decode, verification, drafter steps, predictions) with the attention end
                     # (ple_kernels.ATTENTION_END, session 26) in one command (an H200 only)
    nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 || { echo "not an H200"; exit 3; }
    cp "$BENCH" "$OUT/benchmark_h200.json"
    timeout 585 python experiments/benchmark.py --update --deadline_s=545 \
        --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b --parts=copy,decode,verify,drafter,predict \
        --out="$OUT/benchmark_h200.json" > "$OUT/benchmark_kernels_all.log" 2>&1
    grep -E "ms/step|drafter:|copy band|deadline" "$OUT/benchmark_kernels_all.log" | cut -c1-200
    ;;
  kernels_bench_other)  # session 28, run CM (on an H100): the figures of kernels_bench_all in a
                     # record of their own on any card, then 31B's batch-1 decode and
                     # 5-position verification, then 26B-A4B's and E4B's batch-1 figures in a
                     # second process with 5 repeats (run CM, sent as three commands of
                     # 331, 36 and 96 s, predates bench.forward_ids). An optional second
                     # argument tags the records' names (session 29, run CP: ple5)
    G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$G" in *H200*) C=h200;; *) C=h100;; esac
    C="${2:+${2}_}$C"
    timeout 380 python experiments/benchmark.py --deadline_s=350 \
        --models=gemma4_e4b,gemma4_e2b,gemma4_26b_a4b --parts=copy,decode,verify,drafter,predict \
        --out="$OUT/benchmark_kernels_all_$C.json" > "$OUT/benchmark_kernels_all_$C.log" 2>&1
    timeout 90 python experiments/benchmark.py --deadline_s=75 --models=gemma4_31b --batches=1 \
        --contexts=1024 --verify_k=4 --verify_models=gemma4_31b --parts=copy,decode,verify \
        --out="$OUT/benchmark_31b_$C.json" > "$OUT/benchmark_31b_$C.log" 2>&1
    timeout 110 python experiments/benchmark.py --deadline_s=90 --repeats=5 \
        --models=gemma4_26b_a4b,gemma4_e4b --batches=1 --contexts=1024 --verify_k=4 \
        --verify_models=gemma4_e4b --parts=copy,decode,verify \
        --out="$OUT/benchmark_b1_repeat_$C.json" > "$OUT/benchmark_b1_repeat_$C.log" 2>&1
    grep -hE "ms/step|drafter:|copy band|deadline" "$OUT"/benchmark_*_$C.log | cut -c1-200
    ;;
  ple_verify5)       # session 29, run CO (on an H100; sent ad hoc, this is it): the PLE kernels
                     # (and with them the attention end) at 5 and 9 positions against the
                     # library then (PLE kernels up to 4 positions), E4B in two passes and E2B,
                     # then 26B-A4B's batch-1 step profiled
    G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$G" in *H200*) C=h200;; *) C=h100;; esac
    P="python experiments/step_probe.py --profile_steps=0 --short=8 --long=32"
    timeout 270 $P --models=gemma4_e4b --verify_models=gemma4_e4b --verify_positions=5,9 \
        --variants=fused,fused_ple_on,fused,fused_ple_on --out="$OUT/step_probe_ple5_e4b_$C.json" \
        > "$OUT/step_probe_ple5_e4b_$C.log" 2>&1
    timeout 120 $P --models=gemma4_e2b --verify_models=gemma4_e2b --verify_positions=5 \
        --variants=fused_ple_on,fused --out="$OUT/step_probe_ple5_e2b_$C.json" \
        > "$OUT/step_probe_ple5_e2b_$C.log" 2>&1
    timeout 170 python experiments/step_probe.py --models=gemma4_26b_a4b --verify_models= \
        --variants=fused --profile_steps=4 --short=8 --long=32 --trace_dir=/tmp/tr \
        --out="$OUT/step_profile_26b_$C.json" > "$OUT/step_profile_26b_$C.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_ple5_*_$C.log "$OUT/step_profile_26b_$C.log"
    ;;
  moe_shared_rows)   # session 29, run CQ (measured in run CR): matvec.SHARED_ROWS (a token's routed
                     # experts read its row in place, without XLA's broadcast kernel: 1.25 us
                     # a layer in run CO's profile) against the library: 26B-A4B batch 1
                     # (decode, 5 positions; two passes of the variant around the library's)
                     # and batch 8, then its tests compiled by Triton
    G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$G" in *H200*) C=h200;; *) C=h100;; esac
    timeout 280 python experiments/step_probe.py --models=gemma4_26b_a4b \
        --verify_models=gemma4_26b_a4b --profile_steps=0 --short=8 --long=32 \
        --variants=fused_moe_shared_rows,fused,fused_moe_shared_rows \
        --out="$OUT/step_probe_shared_rows_$C.json" > "$OUT/step_probe_shared_rows.log" 2>&1
    timeout 130 python experiments/step_probe.py --models=gemma4_26b_a4b --verify_models= \
        --batch=8 --variants=fused,fused_moe_shared_rows --profile_steps=0 --short=8 --long=32 \
        --out="$OUT/step_probe_shared_rows_b8_$C.json" > "$OUT/step_probe_shared_rows_b8.log" 2>&1
    grep -hE " ms " "$OUT"/step_probe_shared_rows*.log
    timeout 120 python -m pytest -q -p no:cacheprovider tests/test_matvec.py \
        -k "shared or gathered or bf16_model" > "$OUT/shared_rows_tests.log" 2>&1
    tail -3 "$OUT/shared_rows_tests.log"
    ;;
  moe_shared)        # session 30, run CR (on an H100): run CQ's matvec.SHARED_ROWS and
                     # moe_kernels.SHARED_MLP (the shared MLP as three more groups of the
                     # experts' two kernel calls), each and both, against the library then
                     # (SHARED_MLP off; now on, so its `fused` is the fold): 26B-A4B batch 1
                     # (decode, 5 positions; the library first and last) and batch 8 (where
                     # only the rows apply), then their tests compiled by Triton. Run CR hit
                     # the first probe's 300 s limit after 5 forwards and the tests' 150 s;
                     # both limits since raised, the tests narrowed
    G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$G" in *H200*) C=h200;; *) C=h100;; esac
    timeout 350 python experiments/step_probe.py --models=gemma4_26b_a4b \
        --verify_models=gemma4_26b_a4b --profile_steps=0 --short=8 --long=32 \
        --variants=fused_moe_shared_mlp_off,fused,fused_moe_shared_rows,fused_moe_shared_both,fused_moe_shared_mlp_off \
        --out="$OUT/step_probe_moe_shared_$C.json" > "$OUT/step_probe_moe_shared.log" 2>&1
    grep -hE " ms |Error|error" "$OUT/step_probe_moe_shared.log" | cut -c1-200
    timeout 90 python experiments/step_probe.py --models=gemma4_26b_a4b --verify_models= \
        --batch=8 --variants=fused,fused_moe_shared_rows --profile_steps=0 --short=8 --long=32 \
        --out="$OUT/step_probe_moe_shared_b8_$C.json" > "$OUT/step_probe_moe_shared_b8.log" 2>&1
    grep -hE " ms " "$OUT/step_probe_moe_shared_b8.log"
    timeout 130 python -m pytest -q -p no:cacheprovider tests/test_matvec.py \
        tests/test_moe_kernels.py -k "shared_mlp or dense_chunks or shared_rows" \
        > "$OUT/moe_shared_tests.log" 2>&1
    tail -3 "$OUT/moe_shared_tests.log"
    ;;
  fold_splits)       # session 31, run CS (on an H100): the shared-MLP fold's contraction splits
                     # (then moe_kernels.FOLD_SPLITS: variants fused_fold_down1,
                     # fused_fold_split1, fused_fold_split2_1, all slower, so removed with
                     # their variants) and the router's top k by rank (moe_kernels.TOP_K_RANKS,
                     # a tie) against the library (first and last): 26B-A4B batch-1 decode;
                     # then the tests compiled by Triton. This mode now runs what remains
    G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$G" in *H200*) C=h200;; *) C=h100;; esac
    timeout 250 python experiments/step_probe.py --models=gemma4_26b_a4b --verify_models= \
        --profile_steps=0 --short=8 --long=32 --variants=fused,fused_top_k_ranks,fused \
        --out="$OUT/step_probe_fold_splits_$C.json" > "$OUT/step_probe_fold_splits_$C.log" 2>&1
    grep -hE " ms |Error|error" "$OUT/step_probe_fold_splits_$C.log" | cut -c1-200
    timeout 150 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        -k "route_equals or ties or more_expert_groups" > "$OUT/fold_splits_tests_$C.log" 2>&1
    tail -3 "$OUT/fold_splits_tests_$C.log"
    ;;
  short_kernels)     # session 32, run CT: two switches against the library (first and last):
                     # the attention end and the router's logits as one kernel
                     # (moe_kernels.ROUTER_END, variant fused_moe_router_end), 26B-A4B
                     # batch-1 decode; the several-positions attention kernel's norms as rows
                     # of a block (decode_attention.BLOCK_NORMS, fused_attn_block_norms), E4B
                     # batch-1 decode and 5-position verification; then their tests compiled
                     # by Triton
    G=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    case "$G" in *H200*) C=h200;; *) C=h100;; esac
    P="python experiments/step_probe.py --profile_steps=0 --short=8 --long=32"
    timeout 230 $P --models=gemma4_26b_a4b --verify_models= \
        --variants=fused,fused_moe_router_end,fused \
        --out="$OUT/step_probe_router_end_$C.json" > "$OUT/step_probe_router_end_$C.log" 2>&1
    timeout 230 $P --models=gemma4_e4b --verify_models=gemma4_e4b --verify_positions=5 \
        --variants=fused,fused_attn_block_norms,fused \
        --out="$OUT/step_probe_block_norms_$C.json" > "$OUT/step_probe_block_norms_$C.log" 2>&1
    grep -hE " ms |Error|error" "$OUT"/step_probe_{router_end,block_norms}_$C.log | cut -c1-200
    timeout 120 python -m pytest -q -p no:cacheprovider tests/test_moe_kernels.py \
        tests/test_decode_attention.py -k "router_end or (decode_steps and router and end) or \
        (verification_forwards and block) or (bfloat16 and True-True)" \
        > "$OUT/short_kernels_tests_$C.log" 2>&1
    tail -3 "$OUT/short_kernels_tests_$C.log"
    ;;
  gpu_pair_full)     # session 27, run CK: the GPU pair trained on run AM's full budgets (150 s
                     # target, 75 s drafter) at this library, acceptance on 8 held-out prompts,
                     # then its speeds timed in a fresh process (the slow mode of plain decoding
                     # has been seen only in processes that trained first); gpu_pair_full_eval
                     # times it again in more fresh processes
    SECONDS=0
    timeout 500 python experiments/reproduce_gpu.py --config=configs/reproduce_gpu.py \
        --config.out_dir=runs/gpu --config.full_eval=False --config.measure_speed=False \
        "--config.conventions=('hf',)" --config.eval_prompts=8 > "$OUT/reproduce_full.log" 2>&1
    cp runs/gpu/reproduce.json "$OUT/reproduce_gpu_pair_full_h200.json"
    grep -E "done in|acceptance" "$OUT/reproduce_full.log" | cut -c1-200 | tail -6
    left=$((588 - SECONDS))                  # what is left of one 10-minute command
    if [ "$left" -gt 90 ]; then gpu_pair_fresh_eval 1 "$left"; else echo "no time to time it"; fi
    ;;
  gpu_pair_full_eval)  # session 27, run CK2: run CK's pair (runs/gpu/demo, kept on the machine)
                     # timed in two more fresh processes
    gpu_pair_fresh_eval 2 140
    gpu_pair_fresh_eval 3 140
    ;;
  *)
    echo "usage: $0 train_and_bench | tp_hf_domain | variants_and_bench | fused_one_gpu |" \
         "paired_probe | adaptive_cmdbuf | switch_root | conditional_cmdbuf | unrolled_drafts |" \
         "dispatch_compare | gpu_pair | loop_graphs | pair_layouts | drafter_kernels |" \
         "gpu_pair_kernels | gpu_pair_warm | gpu_pair_k16 | gpu_pair_steps8 | gpu_pair_steps8_eq |" \
         "gpu_pair_decay | drafter_warps | kernels_bench_other |" \
         "released_drafters | kernels_first | drafter_options | drafter_options2 |" \
         "drafter_options3 | drafter_final | drafter_warps_probe | drafter_warps8_probe | decode_attention | decode_attention2 |" \
         "decode_attention3 | decode_attention_big | decode_attention_ranges | ranges_batch4 |" \
         "moe_router |" \
         "decode_attention_bench | ple_kernels | ple_kernels2 | ple_kernels3 | ple_kernels4 |" \
         "ple_verify | kernels_bench | kernels_bench_all |" \
         "ple_verify5 | moe_shared_rows | moe_shared | fold_splits | short_kernels | gpu_pair_full |" \
         "gpu_pair_full_eval" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
