#!/bin/bash
# usage: run.sh NAME  (trace dir /tmp/F/ddp/NAME-trace, run dir /tmp/F/ddp/NAME)
cd /work/wt/handoff
mkdir -p /tmp/F/ddp/$1-trace
TRACE_DIR=/tmp/F/ddp/$1-trace OMP_NUM_THREADS=1 PYTHONPATH=src \
  /work/main/.venv/bin/torchrun --nproc_per_node=2 --master_port=${PORT:-29561} /tmp/F/ddp/trace_pretrain.py \
  --config tiny --data '/tmp/F/sh/train-{000000..000169}.tar' --out /tmp/F/ddp/$1 \
  model.encoder=vit_64x2h2 train.threads=1 data.num_workers=2 train.batch_size=16 \
  train.epochs=2 train.log_every=5 train.knn_at_end=false
