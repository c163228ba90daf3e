"""The command-line flags both entry scripts share (the reference's names and defaults, plus ours)."""
import argparse
import sys

import torch

from dynconv.sparse.ops import BACKENDS


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag gives one line on stderr (no usage block) and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser(description, models, defaults, data_aliases=()):
    """`defaults`: the per-script values of lr, lr_decay, weight_decay, batchsize, epochs, model, data, workers.
    `data_aliases`: other names for --data (e.g. the reference's --dataset-root)."""
    p = OneLineErrorParser(description=description)
    p.add_argument("--model", default=defaults["model"], choices=models, metavar="NAME",
                   help=f"network ({', '.join(models)}; default {defaults['model']})")
    p.add_argument("--budget", type=float, default=-1,
                   help="fraction of conditional MACs to keep, in [0, 1]; -1 = plain ResNet without mask units")
    p.add_argument("--lr", type=float, default=defaults["lr"], help="initial learning rate")
    p.add_argument("--lr_decay", type=int, nargs="*", default=defaults["lr_decay"],
                   help="epochs at which the learning rate is divided by 10")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight_decay", type=float, default=defaults["weight_decay"])
    p.add_argument("--batchsize", type=int, default=defaults["batchsize"], help="batch size (per process)")
    p.add_argument("--epochs", type=int, default=defaults["epochs"])
    p.add_argument("--gumbel_temp", type=float, default=1.0, help="Gumbel-softmax temperature")
    p.add_argument("--gumbel_noise_epochs", type=float, default=0.8,
                   help="fraction of the epochs trained with Gumbel noise (off afterwards)")
    p.add_argument("--sparsity_weight", type=float, default=10.0, help="weight of the sparsity criterion")
    p.add_argument("-s", "--save_dir", default=None,
                   help="run directory for checkpoints, logs and plots (default exp/<dataset>/<model>/<base|sparseBB>)")
    p.add_argument("-r", "--resume", default=None,
                   help="checkpoint file, or a directory holding checkpoint.pth (a directory without one starts a new run)")
    p.add_argument("-e", "--evaluate", action="store_true", help="evaluate the checkpoint given with -r")
    p.add_argument("--plot_ponder", action="store_true", help="save ponder-cost plots of the first images")
    p.add_argument("--plot_dir", default=None, help="where ponder plots go (default <run dir>/ponder)")
    p.add_argument("--plot_count", type=int, default=8, help="number of images to plot")
    p.add_argument("--full_macs", action="store_true",
                   help="also print the fuller operation count (conv, BN, ReLU, linear, pooling)")
    p.add_argument("--fast", action="store_true",
                   help="with -e: also evaluate through the sparse inference engine (skips masked positions)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="sparse engine backend (auto: CUDA kernels via CuPy on GPUs, torch otherwise)")
    p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="PATH",
                   help="initialise from these weights (mask units keep their fresh initialisation)")
    p.add_argument("--workers", type=int, default=defaults["workers"], help="data loader processes")
    p.add_argument("--data", *data_aliases, dest="data", default=defaults["data"], help="dataset root")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--log_dir", default=None, help="TensorBoard directory (default <run dir>/tb)")
    return p
