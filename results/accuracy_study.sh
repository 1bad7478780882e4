#!/usr/bin/env bash
# The accuracy study of issue 12 (README "Results: accuracy"): every run behind the tables, one
# runner call each, then `python -m experiments.studies.accuracy_table`. Two chains run in parallel
# (2 CPU cores, one torch thread each). Usage: bash results/accuracy_study.sh [stories|smollm2|init|all]
#   stories260K (~1-5 min a run): 2 bits, 1.5 and 1.15 bits, and a 2.7-bit effective budget, 3 seeds.
#   SmolLM2-135M (`make assets` first; ~15-20 min a run before fine-tuning, 40-60 min with it):
#   before fine-tuning at 1.15-3 bits, and a 100-step fine-tune at 2 and 1.5 bits (rank 8).
#   init: the ablation of the adapter init (alternations T, relearned codebooks; quant.low_bits_init).
# A run directory that holds results.json is skipped, so an interrupted study resumes.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 WANDB_MODE=offline
COMMON="logger=none progress=false save_model=false eval.max_tokens=8192"
OUT=results/accuracy

one() {  # one DIR LABEL SEED OVERRIDES...  → $OUT/DIR/LABEL_sSEED/
  local dir=$1 label=$2 seed=$3; shift 3
  local run="$OUT/$dir/${label}_s${seed}"
  [ -f "$run/results.json" ] && return 0
  echo "== $dir/$label seed $seed: $*"
  $PY -m experiments.run $COMMON seed="$seed" "$@" "hydra.run.dir=$run" > "$run.log" 2>&1 \
    || echo "!! $dir/$label seed $seed failed (see $run.log)"
}

# The configurations compared (quant=lowra is the measured default: kfac table, {1,2,3,4}, calibrated init).
DEFAULT="quant=lowra"
PAPER="quant=lowra_paper"
UNIFORM_CAL="quant=lowra quant.plan=uniform"                    # every row at the budget, same codebooks/init
UNIFORM_LOFTQ="quant=lowra_paper quant.plan=uniform"            # the same with the paper's LoftQ init
LOFTQ_NF="quant=loftq"
# The init without the default's low-bit rule (quant.low_bits_init): T alternations, fixed or relearned codebooks.
T1="quant=lowra quant.low_bits_init=null"
T4="$T1 quant.loftq_iters=4"
T4_RELEARN="$T4 quant.init_codebooks=relearn"   # = the default's init below 2 bits

stories_a() {
  for s in 0 1 2; do
    one stories260k lowra_b2 $s $DEFAULT +bits=2 train.max_steps=100
    one stories260k lowra_paper_b2 $s $PAPER +bits=2 train.max_steps=100
    one stories260k uniform_calibrated_b2 $s $UNIFORM_CAL +bits=2 train.max_steps=100
    one stories260k uniform_loftq_b2 $s $UNIFORM_LOFTQ +bits=2 train.max_steps=100
    one stories260k loftq_nf_b2 $s $LOFTQ_NF +bits=2 train.max_steps=100
  done
}

stories_b() {
  for s in 0 1 2; do
    one stories260k lowra_b1.5 $s $DEFAULT +bits=1.5 train.max_steps=100
    one stories260k lowra_paper_b1.5 $s $PAPER +bits=1.5 train.max_steps=100
    one stories260k lowra_b1.15 $s $DEFAULT +bits=1.15 train.max_steps=100
    one stories260k lowra_paper_b1.15 $s $PAPER +bits=1.15 train.max_steps=100
    one stories260k lowra_effective_b2.7 $s $DEFAULT quant.budget_kind=effective +bits=2.7 train.max_steps=100
  done
}

smol_a() {  # before fine-tuning
  local M="+model=smollm2_135m train.max_steps=0"
  for b in 2 3 1.5 2.5 1.15; do
    one smollm2 lowra_b$b 0 $M $DEFAULT +bits=$b
    one smollm2 lowra_paper_b$b 0 $M $PAPER +bits=$b
  done
  for b in 2 3; do
    one smollm2 uniform_calibrated_b$b 0 $M $UNIFORM_CAL +bits=$b
  done
  one smollm2 loftq_nf_b2 0 $M $LOFTQ_NF +bits=2  # LoftQ's NormalFloat comes at 2 and 4 bits only
}

smol_b() {  # a short fine-tune at 2 and 1.5 bits (rank 8, 100 steps of 4×256 tokens)
  local M="+model=smollm2_135m train.max_steps=100"
  one smollm2_ft lowra_b2 0 $M $DEFAULT +bits=2
  one smollm2_ft uniform_calibrated_b2 0 $M $UNIFORM_CAL +bits=2
  one smollm2_ft loftq_nf_b2 0 $M $LOFTQ_NF +bits=2
  one smollm2_ft lowra_b1.5 0 $M $DEFAULT +bits=1.5
  one smollm2_ft lowra_b1.5 1 $M $DEFAULT +bits=1.5
}

# The ablation of the adapter init (README "More alternations of the calibrated init").
init_stories() {
  for s in 0 1 2; do
    for b in 1.15 1.5; do
      one stories260k_init lowra_t1_b$b $s $T1 +bits=$b train.max_steps=100
      one stories260k_init lowra_t4_b$b $s $T4 +bits=$b train.max_steps=100
      one stories260k_init lowra_t4_relearn_b$b $s $T4_RELEARN +bits=$b train.max_steps=100
    done
    one stories260k_init lowra_t4_b2 $s $T4 +bits=2 train.max_steps=100
    one stories260k_init lowra_t4_relearn_b2 $s $T4_RELEARN +bits=2 train.max_steps=100
    one stories260k_init uniform_calibrated_t4_relearn_b2 $s $T4_RELEARN quant.plan=uniform +bits=2 train.max_steps=100
    one stories260k_init lowra_t8_b1.15 $s $T1 quant.loftq_iters=8 +bits=1.15 train.max_steps=100
    one stories260k_init lowra_t1_effective_b2.7 $s $T1 quant.budget_kind=effective +bits=2.7 train.max_steps=100
    one stories260k_init lowra_t4_relearn_effective_b2.7 $s $T4_RELEARN quant.budget_kind=effective +bits=2.7 \
      train.max_steps=100
  done
}

init_smollm2() {
  local M="+model=smollm2_135m"
  one smollm2_init lowra_t1_b1.15 0 $M train.max_steps=0 $T1 +bits=1.15
  one smollm2_init lowra_t1_b1.5 0 $M train.max_steps=0 $T1 +bits=1.5
  one smollm2_init lowra_t4_relearn_b1.15 0 $M train.max_steps=0 $T4_RELEARN +bits=1.15
  one smollm2_init lowra_t4_b2 0 $M train.max_steps=0 $T4 +bits=2
  M="$M train.max_steps=100"
  for s in 0 1; do
    one smollm2_ft_init lowra_t1_b1.5 $s $M $T1 +bits=1.5
  done
  one smollm2_ft_init lowra_t4_b2 0 $M $T4 +bits=2
  one smollm2_ft_init lowra_t4_relearn_b2 0 $M $T4_RELEARN +bits=2
  one smollm2_ft_init uniform_calibrated_t4_b2 0 $M $T4 quant.plan=uniform +bits=2
  one smollm2_ft_init uniform_calibrated_t4_relearn_b2 0 $M $T4_RELEARN quant.plan=uniform +bits=2
}

what=${1:-all}
DIRS="stories260k smollm2 smollm2_ft stories260k_init smollm2_init smollm2_ft_init"
for d in $DIRS; do mkdir -p $OUT/$d; done
case $what in
  stories) stories_a & stories_b; wait ;;
  smollm2) smol_a & smol_b; wait ;;
  init) init_stories & init_smollm2; wait ;;
  all) (stories_a; smol_a; init_stories) & (stories_b; smol_b; init_smollm2); wait ;;
esac
for d in $DIRS; do
  ls $OUT/$d/*/results.json > /dev/null 2>&1 && $PY -m experiments.studies.accuracy_table $OUT/$d
done
