#!/bin/bash
# Issue 17 study queue (after tuning): MAE vs CMAE at 1, 3 (seeds 1, 2) and 10 (seed 1) epochs,
# then the equal-wall-time partners: an epoch of CMAE costs ~2 of MAE's here (training time from
# the logs: 1.8-2.3 x in the 1- and 3-epoch runs), so MAE 6 epochs (seeds 1, 2) meets CMAE 3,
# and CMAE 5 epochs (seed 1) meets MAE 10
# Usage: RUNS=... SPLIT=... [PY=...] [CMAE_SETTINGS="..."] [MAE_SETTINGS="..."] benchmarks/evidence/study.sh
# on the 45k train split, kNN monitor every epoch on the 5k val split. Idempotent; resumable.
# The CIFAR-10 test split is touched only by evaluate.py, once, after all runs are done.
set -f
# Long runs: point PYTHONPATH at a snapshot of src/ (git archive HEAD src | tar -x -C SNAP)
# so that edits to the work tree do not reach a running job.
PY=${PY:-python}
R=${RUNS:?set RUNS, a directory outside the work tree}/study

mkdir -p "$R"
D=${SPLIT:?set SPLIT, the output of benchmarks/evidence/split.py}
COMMON="--data $D train.threads=2 data.num_workers=1 train.log_every=10 \
 train.knn_at_end=false train.knn_every=1 data.knn_bank=10000 data.knn_queries=5000 train.resume=auto"
# the presets carry the settings chosen on the validation split (docs/RECIPES.md); *_SETTINGS:
# extra overrides (e.g. the same settings pinned, so a later preset change cannot reach a resume)
CM="--config tiny $COMMON ${CMAE_SETTINGS-}"
MM="--config mae_tiny $COMMON ${MAE_SETTINGS-}"
. "$(dirname "$0")/queue.sh"
# seeds 1 and 2: the tuning ran seed 0, and a setting chosen as the best of several at seed 0
# is flattered by that seed (winner's curse); other seeds are not
for seed in 1 2; do
  run cmae_e1_s$seed $CM train.epochs=1 train.warmup_epochs=0.1 train.seed=$seed
  run mae_e1_s$seed  $MM train.epochs=1 train.warmup_epochs=0.1 train.seed=$seed
done
for seed in 1 2; do
  run cmae_e3_s$seed $CM train.epochs=3 train.warmup_epochs=0.3 train.seed=$seed
  run mae_e3_s$seed  $MM train.epochs=3 train.warmup_epochs=0.3 train.seed=$seed
done
run mae_e10_s1  $MM train.epochs=10 train.warmup_epochs=1 train.seed=1
run cmae_e10_s1 $CM train.epochs=10 train.warmup_epochs=1 train.seed=1
# equal wall time, each run with its own full schedule (a mid-run checkpoint of a longer run
# has not had its lr decayed, so it is not the partner)
for seed in 1 2; do
  run mae_e6_s$seed $MM train.epochs=6 train.warmup_epochs=0.6 train.seed=$seed
done
run cmae_e5_s1 $CM train.epochs=5 train.warmup_epochs=0.5 train.seed=1
