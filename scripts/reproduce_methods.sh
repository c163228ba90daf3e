#!/usr/bin/env bash
# The channel- and weight-dynamic CIFAR-10 runs of the README, in two lanes of one thread each (as
# scripts/reproduce_cifar.sh; every run uses `-s DIR -r DIR`, so starting this script again resumes unfinished
# runs where they stopped; runs go to runs/cifar/..., ignored by git):
# - lane A, PEDConv: pedconv_resnet32 on the shipped dense ResNet-32's schedule (10 epochs, lr 0.1 divided by 10
#   after epochs 5 and 8, batch 128; the CIFAR ResNets' recipe otherwise), to set beside exp/cifar/resnet32/base.
#   About 13-20 minutes per epoch on one thread of the 2-core development CPU.
# - lane B, DGC: dydensenet86 (gate factor 0.25, the paper's) and its counterpart with nothing pruned (gate factor
#   1), the DGC recipe (Nesterov SGD, lr 0.1, cosine per iteration, batch 64) shortened to 2 epochs: about 30-45
#   minutes per epoch on one thread. The finished runs are shipped under exp/cifar_dgc/dydensenet86/{base,g1},
#   stripped in float16 by dynconv/scripts/cifar_results.py --strip (8.8 MB; 17 MB in float32).
# Usage: bash scripts/reproduce_methods.sh [DATA_ROOT] [LANE]   (default data/cifar10-jpeg, both lanes; LANE a or b
# runs that lane alone)
set -u
DATA=${1:-data/cifar10-jpeg}
LANE=${2:-ab}

run() {  # dir, then flags
    local dir=$1
    shift
    mkdir -p "$dir"
    OMP_NUM_THREADS=1 python main_cifar.py --workers 0 --data "$DATA" "$@" -s "$dir" -r "$dir" >> "$dir/train.log" 2>&1
}

lane_a() {
    run runs/cifar/pedconv_resnet32/base --model pedconv_resnet32 --epochs 10 --lr_decay 5 8 --batchsize 128 --lr 0.1
}
lane_b() {
    run runs/cifar/dydensenet86/base --model dydensenet86 --epochs 2
    run runs/cifar/dydensenet86/g1 --model dydensenet86 --gate_factor 1 --epochs 2
}
case $LANE in
    a) lane_a ;;
    b) lane_b ;;
    *) lane_a & lane_b & wait ;;
esac
