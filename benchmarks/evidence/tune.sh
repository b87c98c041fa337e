#!/bin/bash
set -f
# Usage: RUNS=/path/runs SPLIT=/path/cifar_tv PY=python benchmarks/evidence/tune.sh
# Issue 17 tuning queue: one epoch per setting on CIFAR-10 train 45k / val 5k; idempotent
# (a finished run has summary.json; an unfinished one resumes with train.resume=auto).
# Long runs: point PYTHONPATH at a snapshot of src/ (git archive HEAD src | tar -x -C SNAP)
# so that edits to the work tree do not reach a running job.
PY=${PY:-python}
R=${RUNS:?set RUNS, a directory outside the work tree}
mkdir -p "$R"
D=${SPLIT:?set SPLIT, the output of benchmarks/evidence/split.py}
COMMON="--data $D train.epochs=1 train.warmup_epochs=0.1 train.threads=2 data.num_workers=1 \
 train.log_every=10 train.knn_at_end=false train.knn_every=1 data.knn_bank=10000 data.knn_queries=5000 train.seed=0 \
 train.resume=auto"
RULE="model.mask_block=1 data.max_shift=5 data.blur_sigma=[0.014,0.29]"
CM="--config tiny $COMMON $RULE"
MM="--config mae_tiny $COMMON data.max_shift=5 data.mae_same_crop=true"
. "$(dirname "$0")/queue.sh"
run c_base  $CM train.momentum=0.996 train.momentum_end=0.996
run m_base  $MM
run c_m99   $CM train.momentum=0.99 train.momentum_end=0.99
run m_r65   $MM model.mask_ratio=0.65
run c_blr3  $CM train.momentum=0.996 train.momentum_end=0.996 train.blr=3e-3
run m_blr3  $MM train.blr=3e-3
run c_blk2  $CM train.momentum=0.996 train.momentum_end=0.996 model.mask_block=2
run m_rrc   --config mae_tiny $COMMON
run c_sh8   $CM train.momentum=0.996 train.momentum_end=0.996 data.max_shift=8
run m_sh8   $MM data.max_shift=8
# second round, one run per method: each method's next step from its first-round table
run m_r65_sh8 $MM model.mask_ratio=0.65 data.max_shift=8
run c_blr075 $CM train.momentum=0.996 train.momentum_end=0.996 train.blr=7.5e-4
# third round, one run per method: the lr step each method's table points to
run m_r65_blr3 $MM model.mask_ratio=0.65 train.blr=3e-3
run c_blr0375 $CM train.momentum=0.996 train.momentum_end=0.996 train.blr=3.75e-4
# round 4, MAE only (the baseline gets the extra run): the lower lr that helped CMAE in round 2
run m_r65_blr075 $MM model.mask_ratio=0.65 train.blr=7.5e-4
