#!/usr/bin/env bash
# The CIFAR-10 reproduction runs of the README (short schedule: 10 epochs, lr steps at 50% and 75%,
# Gumbel noise off for the last 20%), in two lanes of one thread each: on a 2-core CPU two single-threaded
# runs side by side get through more images per second than one two-threaded run.
# Every run uses `-s DIR -r DIR`, so starting this script again resumes unfinished runs where they stopped.
# Runs go to runs/cifar/<model>/<base|sparseBB> (ignored by git). To ship one: strip it with
#   python scripts/cifar_results.py runs/cifar/*/* --data DATA_ROOT --strip --results runs/cifar/results.jsonl
# then copy its checkpoint_best.pth into exp/cifar/<model>/<base|sparseBB>/ (the tracked, shipped tree).
# Usage: bash scripts/reproduce_cifar.sh [DATA_ROOT]   (default data/cifar10-jpeg)
set -u
DATA=${1:-data/cifar10-jpeg}
COMMON="--epochs 10 --lr_decay 5 8 --batchsize 128 --lr 0.1 --workers 0 --data $DATA"

run() {  # model budget dir
    mkdir -p "$3"
    OMP_NUM_THREADS=1 python main_cifar.py --model "$1" --budget "$2" $COMMON -s "$3" -r "$3" >> "$3/train.log" 2>&1
}

lane_a() {
    run resnet32 0.5 runs/cifar/resnet32/sparse05
    run resnet8 -1 runs/cifar/resnet8/base
    run resnet8 0.25 runs/cifar/resnet8/sparse025
}
lane_b() {
    run resnet32 -1 runs/cifar/resnet32/base
    run resnet20 -1 runs/cifar/resnet20/base
    run resnet8 0.5 runs/cifar/resnet8/sparse05
    run resnet8 0.75 runs/cifar/resnet8/sparse075
}
lane_a & lane_b & wait
