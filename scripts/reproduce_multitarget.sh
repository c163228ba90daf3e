#!/usr/bin/env bash
# The multi-target CIFAR-10 run of the README and its single-budget counterparts, on the shipped short schedule
# (10 epochs, lr steps at 50% and 75%): one ResNet-32 with budgets 0.25/0.5/0.75 distilled from the shipped dense
# ResNet-32, and single-budget ResNet-32s at 0.25 and 0.75 (0.5 is shipped). Two lanes of one thread each, as in
# scripts/reproduce_cifar.sh; every run uses `-s DIR -r DIR`, so starting the script again resumes where runs
# stopped. Runs go to runs/cifar/resnet32/... (ignored by git); ship them as scripts/reproduce_cifar.sh says.
# Usage: bash scripts/reproduce_multitarget.sh [DATA_ROOT]   (default data/cifar10-jpeg)
set -u
DATA=${1:-data/cifar10-jpeg}
COMMON="--model resnet32 --epochs 10 --lr_decay 5 8 --batchsize 128 --lr 0.1 --workers 0 --data $DATA"

run() {  # dir, then flags
    local dir=$1
    shift
    mkdir -p "$dir"
    OMP_NUM_THREADS=1 python main_cifar.py $COMMON "$@" -s "$dir" -r "$dir" >> "$dir/train.log" 2>&1
}

lane_a() {
    run runs/cifar/resnet32/multi025-05-075 --budget_targets 0.25 0.5 0.75 \
        --teacher_weights exp/cifar/resnet32/base/checkpoint_best.pth
}
lane_b() {
    run runs/cifar/resnet32/sparse025 --budget 0.25
    run runs/cifar/resnet32/sparse075 --budget 0.75
}
lane_a & lane_b & wait
