"""PEDConv (Hou and Kung, BMVC 2021): convolutions whose kernel is a shared base kernel W scaled, per image, by a
rank-R (CP) product of attention vectors; ResNets whose 3x3 convs are PEDConv.

Facts from the paper's code (zejiangh/PEDConv, image_classification/resnet.py): the attention generator pools the
input globally, then Linear(C_in -> C_in / 16, bias) -> ReLU -> three Linear heads z_in (C_in / G), z_out (C_out),
z_k (k * k); in training each z gets + 0.1 * N(0, 1); the image's kernel is W * (sigmoid(z_out) (x) sigmoid(z_in)
(x) sigmoid(z_k)). A decoder (Linear(C_in / G + C_out + k * k -> C_in / 16) -> ReLU -> Linear(-> C_in)) rebuilds
the detached pooled input from the noisy z's; its mean squared error, weight 0.001, joins the training loss. The
paper's model inits every BatchNorm to weight 0.5, bias 0, every Linear to N(0, 0.01) with bias 0, convs and W
Kaiming-normal (fan-out, ReLU). Rank R > 1 (a sum of R such products) is an option; the paper uses 1.

Three exact ways to evaluate it (`inference`):
- "grouped" (the paper's, kept as the specification; also the training path): assemble every image's kernel and
  run one conv with groups = N * G;
- "static": never assemble a kernel. The k x k neighbourhoods of the input (unfold) are scaled by sigmoid(z_in)
  per channel and sigmoid(z_k) per tap, multiplied by the static W shared by the whole batch, and the output
  scaled by sigmoid(z_out): one matrix product per rank term;
- "per_image" (the default at evaluation, the fastest measured on CPU, README): the channel factors act on the
  maps (input times sigmoid(z_in), output times sigmoid(z_out)) and only the k*k factor on the kernel, W times
  sigmoid(z_k) per tap, so no (N, C_out, C_in, k, k) tensor is ever built; then one ordinary conv per image.
"""
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from dynconv.decisions import RecordsDecision, StaticDecision, UnitCost
from .base import Decides, ModelConfig, strip_module_prefix
from .registry import register_model
from .resnet import BasicBlock
from .resnet_cifar import CIFAR_RESNET, CifarResNet
from .resnet_imagenet import ResNet

NOISE_STD = 0.1  # the paper's fixed reparameterisation noise in training
DECODER_WEIGHT = 0.001  # the paper's weight of the reconstruction (information) loss
REDUCTION = 16
INFERENCE_PATHS = ("per_image", "static", "grouped")


class Attention(nn.Module):
    """The attention generator and its training-only decoder (the paper's keys: fc_share, fc_inp, fc_oup, fc_k,
    decoder.0, decoder.2). `forward(x) -> (a_in (N, R, C_in/G), a_out (N, R, C_out), a_k (N, R, k*k), loss)`."""

    def __init__(self, in_channels, out_channels, kernel_size, groups, rank):
        super().__init__()
        hidden, per_group = in_channels // REDUCTION, in_channels // groups
        self.rank, self.sizes = rank, (per_group, out_channels, kernel_size * kernel_size)
        self.fc_share = nn.Linear(in_channels, hidden)
        self.fc_inp = nn.Linear(hidden, per_group * rank)
        self.fc_oup = nn.Linear(hidden, out_channels * rank)
        self.fc_k = nn.Linear(hidden, kernel_size * kernel_size * rank)
        self.decoder = nn.Sequential(nn.Linear(sum(self.sizes) * rank, hidden), nn.ReLU(), nn.Linear(hidden, in_channels))

    def generator_macs(self):
        """Per image: the four generator Linears with their biases (the decoder runs in training only)."""
        layers = (self.fc_share, self.fc_inp, self.fc_oup, self.fc_k)
        return sum(m.weight.numel() + m.bias.numel() for m in layers)

    def forward(self, x):
        pooled = x.mean((2, 3))
        hidden = F.relu(self.fc_share(pooled))
        z = [fc(hidden) for fc in (self.fc_inp, self.fc_oup, self.fc_k)]
        loss = None
        if self.training:
            z = [v + NOISE_STD * torch.randn_like(v) for v in z]
            loss = DECODER_WEIGHT * F.mse_loss(self.decoder(torch.cat(z, 1)), pooled.detach())
        n = x.shape[0]
        # rank term r of each vector: the paper's layout for R > 1 is (size, R), r fastest
        a_in, a_out, a_k = (torch.sigmoid(v).view(n, size, self.rank).transpose(1, 2) for v, size in zip(z, self.sizes))
        return a_in, a_out, a_k, loss


class PEDConv(RecordsDecision, nn.Module):
    """A PEDConv C_in -> C_out (k x k, stride, groups G, rank R), a drop-in conv layer (`conv_layer(in, out,
    kernel_size, stride)`): returns the output and records a StaticDecision with its MACs and the decoder loss."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, rank=1, inference="per_image"):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"PEDConv: {groups} groups must divide the channels ({in_channels} -> {out_channels})")
        if rank < 1:
            raise ValueError(f"PEDConv: the rank must be at least 1, got {rank}")
        if inference not in INFERENCE_PATHS:
            raise ValueError(f"PEDConv: inference must be one of {', '.join(INFERENCE_PATHS)}, got {inference}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.groups, self.rank, self.inference = stride, kernel_size // 2, groups, rank, \
            inference
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.attn = Attention(in_channels, out_channels, kernel_size, groups, rank)

    def uncounted_modules(self, full=False):
        return (self.attn,)  # counted in the decision

    def forward(self, x):
        a_in, a_out, a_k, loss = self.attn(x)
        path = "grouped" if self.training else self.inference  # grouped: the fastest to train on CPU
        out = getattr(self, path)(x, a_in, a_out, a_k)
        detail = None if self.training else {"in": a_in.detach(), "out": a_out.detach(), "k x k": a_k.detach()}
        self.record(StaticDecision(self.cost(x.shape[0], x.shape[-2] * x.shape[-1], out.shape[-2] * out.shape[-1],
                                             path), loss=loss, detail=detail))
        return out

    def kernels(self, a_in, a_out, a_k):
        """(N, C_out, C_in/G, k, k): every image's kernel, W times the sum of its rank-1 products."""
        k = self.kernel_size
        attention = torch.einsum("nro,nri,nrt->noit", a_out, a_in, a_k)
        return self.weight[None] * attention.view(*attention.shape[:3], k, k)

    def grouped(self, x, a_in, a_out, a_k):
        """The paper's path: every image's kernel, one conv with a group per image and conv group."""
        n, c, height, width = x.shape
        kernels = self.kernels(a_in, a_out, a_k)
        out = F.conv2d(x.reshape(1, n * c, height, width), kernels.reshape(n * self.out_channels, *kernels.shape[2:]),
                       None, self.stride, self.padding, groups=n * self.groups)
        return out.view(n, self.out_channels, *out.shape[-2:])

    def static(self, x, a_in, a_out, a_k):
        """The same function with the static W: scaled neighbourhoods, one product per rank term, scaled outputs."""
        n, c, height, width = x.shape
        k, g = self.kernel_size, self.groups
        size = [(s + 2 * self.padding - k) // self.stride + 1 for s in (height, width)]
        cols = F.unfold(x, k, padding=self.padding, stride=self.stride)  # (N, C * k*k, L), rows c * k*k + t
        weight = self.weight.reshape(g, self.out_channels // g, -1)
        out = 0
        for r in range(self.rank):
            # channel c of group j uses a_in[c - j * C/G]: the same vector for every group
            scale = (a_in[:, r, :, None] * a_k[:, r, None, :]).repeat(1, g, 1).reshape(n, g, -1, 1)
            term = torch.matmul(weight, cols.view(n, g, -1, cols.shape[-1]) * scale)  # (N, G, C_out/G, L)
            out = out + term.reshape(n, self.out_channels, -1) * a_out[:, r, :, None]
        return out.view(n, self.out_channels, *size)

    def per_image(self, x, a_in, a_out, a_k):
        """The same function with the channel factors on the maps and the tap factor on W: per rank term, the
        input times a_in, one conv per image with W times that image's a_k, the output times a_out."""
        n, k, g = x.shape[0], self.kernel_size, self.groups
        out = 0
        for r in range(self.rank):
            scaled = x * a_in[:, r].repeat(1, g)[:, :, None, None]  # channel c of group j uses a_in[c - j * C/G]
            taps = a_k[:, r].view(n, 1, 1, k, k)
            term = torch.cat([F.conv2d(scaled[i:i + 1], self.weight * taps[i], None, self.stride, self.padding,
                                       groups=g) for i in range(n)])
            out = out + term * a_out[:, r, :, None, None]
        return out

    def cost(self, images, in_positions, positions, path):
        """MACs of the batch: the conv (once per rank term except on the grouped path), the generators, and what
        applying the attention costs per rank term: grouped, assembling the kernels (C_out * C_in/G, then * k*k;
        W times the sum: about 2 multiplies per kernel element at rank 1, 22 M per ResNet-18 image); static,
        scaling the neighbourhoods (C_in * k*k per position) and outputs (C_out per position); per_image,
        scaling the input (C_in per input position), W by the taps (one per kernel element) and the outputs."""
        conv = self.weight.numel() * positions
        kernel_elements = self.weight.numel()
        if path == "grouped":  # per rank term a_out (x) a_in, then (x) a_k; then W times the sum
            applying = self.rank * (kernel_elements // self.kernel_size ** 2 + kernel_elements) + kernel_elements
        elif path == "static":
            taps = self.in_channels * self.kernel_size ** 2
            applying = self.rank * (taps + taps * positions + self.out_channels * positions)
        else:
            applying = self.rank * (self.in_channels * in_positions + kernel_elements + self.out_channels * positions)
        if path != "grouped":
            conv *= self.rank
        macs = images * (conv + self.attn.generator_macs() + applying)
        return UnitCost(macs, macs)


def pedconv_init(model):
    """The paper's initialisation: BatchNorm weight 0.5 and bias 0, Linears N(0, 0.01) with bias 0 (convs and W
    keep Kaiming-normal, fan-out)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


def _pedconv_layer(rank, inference):
    def conv_layer(in_channels, out_channels, kernel_size, stride=1):
        return PEDConv(in_channels, out_channels, kernel_size, stride, rank=rank, inference=inference)
    return conv_layer


OPTIONS = {"rank": (1, "PEDConv: rank of the attention (a sum of this many rank-1 products)"),
           "inference": ("per_image", "PEDConv evaluation path: per_image (channel attention on the maps, W scaled "
                                      "per tap, a conv per image), static (static W, scaled neighbourhoods) or "
                                      "grouped (every image's full kernel, one grouped conv: the paper's)")}
# the paper's ImageNet recipe (NVIDIA DeepLearningExamples): lr 0.256 per 256 images; no weight decay on norm
# parameters (here all 1-D parameters: norm weights and biases, and the biases of the Linears)
IMAGENET_PEDCONV = ModelConfig(
    checkpoint_filter=strip_module_prefix, gates=Decides.WEIGHTS, options=OPTIONS, free_options=("inference",), input_multiple=32,
    speed_benchmark="dynconv.benchmarks.pedconv_speed", method="PEDConv", plot_style=("PEDConv", "^", "tab:red"),
    recipe=dict(opt="sgd", lr=0.256, momentum=0.875, weight_decay=2 ** -15, no_wd_norm_bias=True, sched="cosine",
                warmup_epochs=8, epochs=250, batchsize=256, smoothing=0.1, mixup=0.2, auto_augment="imagenet"))


def _build(factory, kwargs, **fixed):
    options = {name: kwargs.pop(name, default) for name, (default, _) in OPTIONS.items()}
    if kwargs.pop("gate_layer", None) is not None:
        raise ValueError("PEDConv models have no gates: --budget does not apply")
    model = pedconv_init(factory(conv_layer=_pedconv_layer(**options), **fixed, **kwargs))
    model.options = options
    return model


@register_model("imagenet", IMAGENET_PEDCONV)
def pedconv_resnet18(**kwargs):
    """ResNet-18 with PEDConv 3x3 convs (the downsample static)."""
    return _build(ResNet, kwargs, block=BasicBlock, layers=(2, 2, 2, 2))


# CIFAR ResNets with PEDConv 3x3 convs: the CIFAR ResNets' normalisation and recipe
CIFAR_PEDCONV = dataclasses.replace(CIFAR_RESNET, gates=Decides.WEIGHTS, options=OPTIONS, free_options=("inference",),
                                    speed_benchmark="dynconv.benchmarks.pedconv_speed", method="PEDConv",
                                    plot_style=IMAGENET_PEDCONV.plot_style)


@register_model("cifar", CIFAR_PEDCONV)
def pedconv_resnet8(**kwargs):
    return _build(CifarResNet, kwargs, blocks_per_stage=1)


@register_model("cifar", CIFAR_PEDCONV)
def pedconv_resnet20(**kwargs):
    return _build(CifarResNet, kwargs, blocks_per_stage=3)


@register_model("cifar", CIFAR_PEDCONV)
def pedconv_resnet32(**kwargs):
    return _build(CifarResNet, kwargs, blocks_per_stage=5)
