#!/usr/bin/env bash
# The ConvNeXt runs of docs/convnext.md: convnext_atto dense and with budgets 0.25 and 0.5 on the CIFAR-10 image
# folders upscaled to 64x64, from scratch, the ConvNeXt recipe shortened to 3 epochs (1 warm-up epoch, no freeze,
# EMA decay 0.999), batch 64, seed 0, one after the other on one thread (about 40 minutes per run on one thread of
# the 2-core development CPU). Every run uses `-s DIR -r DIR`, so starting this script again resumes unfinished runs;
# runs go to runs/cifar64/... (ignored by git); the shipped ones are stripped into exp/cifar64/convnext_atto/ by
# dynconv/scripts/cifar_results.py --strip (float16, 6.8 MB).
# Usage: bash scripts/reproduce_convnext.sh [DATA_ROOT]   (default data/cifar10-jpeg)
set -u
DATA=${1:-data/cifar10-jpeg}

run() {  # dir, budget
    local dir=$1
    mkdir -p "$dir"
    OMP_NUM_THREADS=1 python main_imagenet.py --model convnext_atto --budget "$2" --workers 0 --data "$DATA" \
        --resolution 64 --epochs 3 --warmup_epochs 1 --freeze backbone=0 --lr_scale backbone=1 --model_ema_decay 0.999 \
        -s "$dir" -r "$dir" >> "$dir/train.log" 2>&1
}

run runs/cifar64/convnext_atto/sparse025 0.25
run runs/cifar64/convnext_atto/sparse05 0.5
run runs/cifar64/convnext_atto/base -1
