#!/usr/bin/env bash
# The multi-target CIFAR-10 run of the README and its single-budget counterparts, on the shipped short schedule
# (10 epochs, lr steps at 50% and 75%): one ResNet-32 with budgets 0.25/0.5/0.75 distilled from the shipped dense
# ResNet-32, and single-budget ResNet-32s at 0.25 and 0.75 (0.5 is shipped). Two lanes of one thread each, as in
# scripts/reproduce_cifar.sh; every run uses `-s DIR -r DIR`, so starting the script again resumes where runs
# stopped. Runs go to runs/cifar/resnet32/... (ignored by git); ship them as scripts/reproduce_cifar.sh says.
# The second schedule, `finetune` (issue 30: the paper's set-up, all four from pretrained dense weights): the
# multi-target ResNet-32 and single-budget ResNet-32s at 0.25 / 0.5 / 0.75, each started from the shipped 30-epoch
# dense ResNet-32 (--pretrained) and distilled from it (the same teacher for all four, so that only multi- against
# single-target differs), 10 epochs, batch 256, lr 0.01 (a tenth of the from-scratch lr: the convolutions start
# trained) divided by 10 after epochs 5 and 8, under runs/cifar30/resnet32/finetune/{multi,sparse025,sparse05,sparse075}.
# The ablation `finetune_gates10`: the multi-target and the budget-0.25 runs of `finetune` with the gates' learning
# rate 10x the backbone's (--lr_scale gates=10: 0.1, the from-scratch lr), under runs/cifar30/resnet32/finetune_gates10/.
# Two more ablations of the multi-target run of `finetune`, one lane each: `finetune_untied`, one norm affine per
# budget (--no-tied_norms), under runs/cifar30/resnet32/finetune_untied/multi; `finetune_long`, 3x the epochs (30,
# lr steps after 15 and 24), so that each budget gets as many steps as a 10-epoch single-budget run, under
# runs/cifar30/resnet32/finetune_long/multi (about 4 minutes per epoch alone on the 2-core CPU, 8 beside another run).
# Usage: bash scripts/reproduce_multitarget.sh [DATA_ROOT] [short|finetune|finetune_gates10|finetune_untied|finetune_long]
#        (defaults data/cifar10-jpeg, short)
set -u
DATA=${1:-data/cifar10-jpeg}
SCHEDULE=${2:-short}
DENSE=exp/cifar30/resnet32/base/checkpoint_best.pth
if [ "${SCHEDULE#finetune}" != "$SCHEDULE" ]; then
    COMMON="--model resnet32 --epochs 10 --lr_decay 5 8 --batchsize 256 --lr 0.01 --workers 0 --data $DATA
            --pretrained $DENSE --teacher_weights $DENSE"
else
    COMMON="--model resnet32 --epochs 10 --lr_decay 5 8 --batchsize 128 --lr 0.1 --workers 0 --data $DATA"
fi

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
finetune_a() {
    run runs/cifar30/resnet32/finetune/multi --budget_targets 0.25 0.5 0.75
    run runs/cifar30/resnet32/finetune/sparse075 --budget 0.75
}
finetune_b() {
    run runs/cifar30/resnet32/finetune/sparse025 --budget 0.25
    run runs/cifar30/resnet32/finetune/sparse05 --budget 0.5
}
if [ "$SCHEDULE" = finetune_gates10 ]; then
    run runs/cifar30/resnet32/finetune_gates10/multi --budget_targets 0.25 0.5 0.75 --lr_scale gates=10 &
    run runs/cifar30/resnet32/finetune_gates10/sparse025 --budget 0.25 --lr_scale gates=10 &
    wait
elif [ "$SCHEDULE" = finetune_untied ]; then
    run runs/cifar30/resnet32/finetune_untied/multi --budget_targets 0.25 0.5 0.75 --no-tied_norms
elif [ "$SCHEDULE" = finetune_long ]; then
    run runs/cifar30/resnet32/finetune_long/multi --budget_targets 0.25 0.5 0.75 --epochs 30 --lr_decay 15 24
elif [ "$SCHEDULE" = finetune ]; then
    finetune_a & finetune_b & wait
else
    lane_a & lane_b & wait
fi
