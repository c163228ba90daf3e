#!/usr/bin/env bash
# The CIFAR-10 reproduction runs of the README (short schedule: 10 epochs, lr steps at 50% and 75%,
# Gumbel noise off for the last 20%), in two lanes of one thread each: on a 2-core CPU two single-threaded
# runs side by side get through more images per second than one two-threaded run.
# Every run uses `-s DIR -r DIR`, so starting this script again resumes unfinished runs where they stopped.
# Runs go to runs/cifar/<model>/<base|sparseBB> (ignored by git). To ship one: strip it with
#   python -m dynconv.scripts.cifar_results runs/cifar/*/* --data DATA_ROOT --strip --results runs/cifar/results.jsonl
# then copy its checkpoint_best.pth into exp/cifar/<model>/<base|sparseBB>/ (the tracked, shipped tree).
# The second schedule, `long` (issue 16: the schedule the reference code was measured with, ResNet-8 79.9% dense
# and 78.4% at budget 0.5): 30 epochs, batch 256, lr 0.1 divided by 10 after epochs 15 and 22, the compared
# ResNets (resnet8 and resnet32 dense and at budgets 0.25 / 0.5 / 0.75, resnet14 and resnet20 dense) under
# runs/cifar30/. It takes longer than one session: commit the unfinished runs' checkpoint.pth (git add -f) and
# start the script again in the next session to resume them. Finished runs are shipped under exp/cifar30/ (README).
# The third, `tiles` (issue 29): the long schedule for ResNet-32 at budgets 0.25 and 0.5 with one decision per
# block and image (--tiles 32 16 8, chosen on 10-epoch pilots), under runs/cifar30/resnet32/tiles{025,05}.
# The fourth, `pilots` (issue 29: choosing the tile sides on a short schedule): ResNet-8 at budget 0.5 on the short
# schedule with tiles 4 2 1, 8 4 2 and whole blocks (32 16 8), one lane (beside the per-position run of `short`,
# exp/cifar/resnet8/sparse05), under runs/cifar_pilots/resnet8/tiles{421,842,whole}.
# Usage: bash scripts/reproduce_cifar.sh [DATA_ROOT] [short|long|tiles|pilots]   (defaults data/cifar10-jpeg, short)
set -u
DATA=${1:-data/cifar10-jpeg}
SCHEDULE=${2:-short}
if [ "$SCHEDULE" = long ] || [ "$SCHEDULE" = tiles ]; then
    COMMON="--epochs 30 --lr_decay 15 22 --batchsize 256 --lr 0.1 --workers 0 --data $DATA"
    OUT=runs/cifar30
else
    COMMON="--epochs 10 --lr_decay 5 8 --batchsize 128 --lr 0.1 --workers 0 --data $DATA"
    OUT=runs/cifar
fi
if [ "$SCHEDULE" = pilots ]; then
    OUT=runs/cifar_pilots
fi

run() {  # model budget dir (under $OUT) [extra flags]
    local dir=$OUT/$3
    mkdir -p "$dir"
    OMP_NUM_THREADS=1 python main_cifar.py --model "$1" --budget "$2" $COMMON "${@:4}" -s "$dir" -r "$dir" \
        >> "$dir/train.log" 2>&1
}

short_a() {
    run resnet32 0.5 resnet32/sparse05
    run resnet8 -1 resnet8/base
    run resnet8 0.25 resnet8/sparse025
}
short_b() {
    run resnet32 -1 resnet32/base
    run resnet20 -1 resnet20/base
    run resnet8 0.5 resnet8/sparse05
    run resnet8 0.75 resnet8/sparse075
}
long_a() {  # the small networks first: the ResNet-8 answer comes within the first session
    run resnet8 -1 resnet8/base
    run resnet8 0.5 resnet8/sparse05
    run resnet14 -1 resnet14/base
    run resnet32 -1 resnet32/base
    run resnet32 0.5 resnet32/sparse05
}
long_b() {
    run resnet8 0.25 resnet8/sparse025
    run resnet8 0.75 resnet8/sparse075
    run resnet20 -1 resnet20/base
    run resnet32 0.25 resnet32/sparse025
    run resnet32 0.75 resnet32/sparse075
}
tiles_a() { run resnet32 0.25 resnet32/tiles025 --tiles 32 16 8; }
tiles_b() { run resnet32 0.5 resnet32/tiles05 --tiles 32 16 8; }
pilots_a() {
    run resnet8 0.5 resnet8/tiles421 --tiles 4 2 1
    run resnet8 0.5 resnet8/tiles842 --tiles 8 4 2
    run resnet8 0.5 resnet8/whole --tiles 32 16 8
}
pilots_b() { :; }
${SCHEDULE}_a & ${SCHEDULE}_b & wait
