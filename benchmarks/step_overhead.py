"""Cost of a full L0 training step relative to a plain one, on CPU, as ratios from one run.

For MLP 784-300-100 and LeNet-5-Caffe (20-50-800-500) at batch 128, times a full step
(forward, cross-entropy + penalty, backward, Adam step) of: the plain model; ``L0Regularizer``
with weight gates (with its fused CPU gate kernels, ``l0core.native``, and with the eager code
they replace) and with output gates; the least an eager implementation of output gates can do
(``MinimalOutputL0``: hooks, sampling and penalty written for the model, nothing else: the floor
under ``L0 output``); and the copy-delete-replug reference design (re-implemented below: a copied
module whose parameters move to a dict, one mask logit per element, a Python loop that samples
every mask and plugs masked tensors back in on every forward). Configurations are
interleaved round by round, in a new order each round, so that machine noise hits them alike,
and each block of steps starts with an untimed one (the switch from another configuration); the
table shows medians.

Each allocator mode runs in its own process: ``default`` (glibc as the process starts) and
``tuned`` (``l0core.cpu.tune_allocator()``, which stops glibc from returning every freed
activation buffer to the kernel, a 2x speed-up of small CPU training steps on this machine).

``gate products alone`` is the MLP with fixed output gates that require grad and nothing else (no
sampling, no penalty, no gate parameter for Adam): what multiplying the activations by gates and
computing their gradients costs by itself, the part of any output gating done with activations.

The ``--families`` run times the graph-shaped models instead, each against its plain step at
batch 128 on 32x32 inputs: ResNet-20 with coupled output gates and a 4-layer ViT with head and MLP
gates (the two with step targets), then one model of every other family the graph planner gates
(``docs/GRAPHS.md``): the torchvision-layout ResNet-18 and ResNet-50 and GoogLeNet at a quarter
width, MobileNetV2 at half width, a GroupNorm ResNet, a pre-norm LayerNorm MLP and a
``nn.TransformerEncoder`` (heads and hidden units); and the export (``prune(shrink=True)``) of a
ResNet-18-layout model with half of its units closed. ``--only NAME`` keeps the families whose
name contains NAME.

    python benchmarks/step_overhead.py [--rounds 30] [--steps 5] [--compile] [--families]
                                       [--only NAME] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from l0core import L0Regularizer, native
from sweeps.zoo import GoogLeNet, MobileNetV2, ViT, cifar_resnet, resnet

FOREACH = None


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )  # fmt: skip


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )  # fmt: skip


class ReferenceL0(nn.Module):
    """The copy-delete-replug design: every parameter gated, per element, sampled in a loop."""

    def __init__(self, module: nn.Module, droprate_init: float = 0.2) -> None:
        super().__init__()
        self.module = copy.deepcopy(module)
        self.weights = nn.ParameterDict()
        self.masks = nn.ParameterDict()
        self._where = {}
        for name, p in list(self.module.named_parameters()):
            key = name.replace(".", "#")
            mod_name, _, attr = name.rpartition(".")
            owner = self.module.get_submodule(mod_name)
            self.weights[key] = nn.Parameter(p.data.clone())
            la = math.log(1 - droprate_init) - math.log(droprate_init)
            self.masks[key] = nn.Parameter(torch.empty_like(p).normal_(la, 1e-2))
            delattr(owner, attr)
            self._where[key] = (owner, attr)
        self.beta, self.gamma, self.zeta = 2 / 3, -0.1, 1.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for key, w in self.weights.items():
            la = self.masks[key]
            u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + la) / self.beta)
            z = (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
            owner, attr = self._where[key]
            setattr(owner, attr, w * z)
        return self.module(x)

    def regularization(self) -> torch.Tensor:
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return torch.cat([torch.sigmoid(m - shift).view(-1) for m in self.masks.values()]).sum()


class MinimalOutputL0(nn.Module):
    """The least an eager implementation of output gates does, written for this one model: one
    logit per output unit of every Linear/Conv2d but the last (whose units are the model's
    outputs, which the library does not gate either), forward hooks registered once that scale
    the outputs by gates sampled once per forward, and the L0 penalty. No coupled groups,
    export, replay, probing or bounds: what a step costs below the library's bookkeeping."""

    def __init__(self, module: nn.Module, droprate_init: float = 0.2) -> None:
        super().__init__()
        self.module = copy.deepcopy(module)
        layers = [m for m in self.module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]
        sizes = [m.weight.shape[0] for m in layers]
        la = math.log(1 - droprate_init) - math.log(droprate_init)
        self.log_alpha = nn.Parameter(torch.empty(sum(sizes)).normal_(la, 1e-2))
        self.beta, self.gamma, self.zeta = 2 / 3, -0.1, 1.1
        self._z: list[torch.Tensor] = []
        for i, m in enumerate(layers):
            m.register_forward_hook(lambda mod, args, out, i=i: out * self._view(self._z[i], out))
        self._sizes = sizes

    @staticmethod
    def _view(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return z.view(-1, *([1] * (out.dim() - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.empty_like(self.log_alpha).uniform_(1e-6, 1 - 1e-6).logit_()
        s = torch.sigmoid((u + self.log_alpha) / self.beta)
        z = (s * (self.zeta - self.gamma) + self.gamma).clamp(0, 1)
        self._z = list(z.split(self._sizes))
        return self.module(x)

    def regularization(self) -> torch.Tensor:
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return 1e-6 * torch.sigmoid(self.log_alpha - shift).sum()


class GateProductsOnly(MinimalOutputL0):
    """``MinimalOutputL0``'s hooks on fixed gates that require grad, a new leaf per forward: the
    multiplications and the gates' gradients, and nothing else (no sampling, no penalty; its
    logits never get a gradient, so Adam skips them)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self._values = torch.rand(sum(self._sizes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._z = list(self._values.detach().requires_grad_().split(self._sizes))
        return self.module(x)

    def regularization(self) -> float:
        return 0.0


def _configs(model_fn, compile_: bool):
    base = model_fn()
    yield "plain", copy.deepcopy(base), None
    yield "L0 weight", None, L0Regularizer(copy.deepcopy(base), 1e-6)
    yield "L0 weight, eager kernels", None, L0Regularizer(copy.deepcopy(base), 1e-6)
    yield "L0 output", None, L0Regularizer(copy.deepcopy(base), 1e-6, granularity="output")
    yield "minimal output gates (hand-written)", None, MinimalOutputL0(copy.deepcopy(base))
    yield "gate products alone", None, GateProductsOnly(copy.deepcopy(base))
    yield "reference design", None, ReferenceL0(copy.deepcopy(base))
    if compile_:
        reg = L0Regularizer(copy.deepcopy(base), 1e-6)
        yield "L0 weight, torch.compile", None, torch.compile(reg)


def _stepper(model, reg, x, y):
    net = reg if reg is not None else model
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=FOREACH)

    def step() -> None:
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        if reg is not None:
            loss = loss + reg.regularization()
        loss.backward()
        opt.step()

    return step


def _eager(step):
    """``step`` with l0core's eager gate code instead of its fused CPU kernels (l0core.native)."""

    def eager_step() -> None:
        with native.disabled():
            step()

    return eager_step


def _interleaved_medians(steppers: dict, rounds: int, steps: int, warmup: int) -> dict:
    """Median seconds per step of each stepper, timed round by round side by side (so load on a
    shared machine hits every configuration alike), after ``warmup`` steps each.

    A training loop runs one configuration step after step; interleaving them adds a switch, whose
    first step pays for the previous configuration's caches and heap (three identical L0
    configurations timed after the plain one in a fixed order measured 1.24x, 1.22x and 1.20x of
    its step). So each block starts with one untimed step, and each round runs the
    configurations in a new order (seeded)."""
    times = {key: [] for key in steppers}
    for step in steppers.values():  # warm-up (and compilation)
        for _ in range(warmup):
            step()
    order, rng = list(steppers), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for key in order:
            step = steppers[key]
            step()  # the switch: caches and heap of this configuration again
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            times[key].append((time.perf_counter() - t0) / steps)
    return {key: statistics.median(ts) for key, ts in times.items()}


def measure(rounds: int, steps: int, compile_: bool) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    results = {}
    for model_name, fn, shape in (("MLP 784-300-100", mlp, (128, 1, 28, 28)),
                                  ("LeNet-5-Caffe", lenet5, (128, 1, 28, 28))):  # fmt: skip
        x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
        steppers = {name: _stepper(m, r, x, y) for name, m, r in _configs(fn, compile_)}
        steppers["L0 weight, eager kernels"] = _eager(steppers["L0 weight, eager kernels"])
        results[model_name] = _interleaved_medians(steppers, rounds, steps, warmup=5)
    return results


class GNBlock(nn.Module):
    def __init__(self, c: int, groups: int) -> None:
        super().__init__()
        self.conv1, self.gn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups, c)
        self.conv2, self.gn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.GroupNorm(groups, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(out)) + x)


class GNResNet(nn.Module):
    """A residual network normalized by GroupNorm (BatchNorm-free, as for small batches)."""

    def __init__(self, c: int = 32, groups: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.stem, self.gn = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(groups, c)
        self.blocks = nn.Sequential(*[GNBlock(c, groups) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(torch.relu(self.gn(self.stem(x)))).mean((2, 3)))


class LNMlp(nn.Module):
    """Pre-norm residual MLP blocks on a LayerNorm-ed stream, and a final LayerNorm."""

    def __init__(self, d: int = 256, hidden: int = 512, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 32 * 32, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.fc1 = nn.ModuleList([nn.Linear(d, hidden) for _ in range(depth)])
        self.fc2 = nn.ModuleList([nn.Linear(hidden, d) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1))
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2, strict=True):
            x = x + fc2(F.gelu(fc1(norm(x))))
        return self.head(self.norm(x))


class EncoderNet(nn.Module):
    """4x4 patches into an ``nn.TransformerEncoder`` (post-norm layers), mean-pooled."""

    def __init__(self, dim: int = 128, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


_IMAGE = (3, 32, 32)
# (family, gated configuration, model, granularity): the first two carry the targets
FAMILIES = (
    ("ResNet-20", "L0 output (coupled groups)", lambda: cifar_resnet(20, _IMAGE, 10), "output"),
    ("ViT 4x128", "L0 head + MLP",
     lambda: ViT(_IMAGE, 10, patch=4, dim=128, depth=4, heads=4, mlp_ratio=2.0),
     ["head", "output"]),
    ("ResNet-18 (width 0.25)", "L0 output (coupled groups)",
     lambda: resnet(18, _IMAGE, 10, width=0.25), "output"),
    ("ResNet-50 (width 0.25)", "L0 output (coupled groups)",
     lambda: resnet(50, _IMAGE, 10, width=0.25), "output"),
    ("GoogLeNet (width 0.25)", "L0 output (coupled groups)",
     lambda: GoogLeNet(_IMAGE, 10, width=0.25), "output"),
    ("MobileNetV2 (width 0.5)", "L0 output (coupled groups)",
     lambda: MobileNetV2(_IMAGE, 10, width=0.5), "output"),
    ("GroupNorm ResNet", "L0 output (GroupNorm groups)", GNResNet, "output"),
    ("LayerNorm MLP", "L0 output", LNMlp, "output"),
    ("nn.TransformerEncoder 4x128", "L0 head + MLP", EncoderNet, ["head", "output"]),
)  # fmt: skip


def _family_configs(only: str | None = None):
    for family, config, build, granularity in FAMILIES:
        if only is not None and only.lower() not in family.lower():
            continue
        model = build()
        yield family, "plain", copy.deepcopy(model), None
        reg = L0Regularizer(copy.deepcopy(model), 1e-6, granularity=granularity)
        yield family, config, None, reg


def measure_families(rounds: int, steps: int, only: str | None = None) -> dict:
    torch.manual_seed(0)
    x, y = torch.randn(128, *_IMAGE), torch.randint(0, 10, (128,))
    configs = list(_family_configs(only))
    steppers = {(m, c): _stepper(net, reg, x, y) for m, c, net, reg in configs}
    results: dict[str, dict[str, float]] = {}
    for (m, c), median in _interleaved_medians(steppers, rounds, steps, warmup=2).items():
        results.setdefault(m, {})[c] = median
    if only is not None and only.lower() not in "resnet-18 export":
        return results
    reg = L0Regularizer(resnet(18, _IMAGE, 10), 1e-6, granularity="output")
    reg(x[:8])
    with torch.no_grad():
        la = reg.unit_log_alpha
        la.copy_(torch.where(torch.rand(la.shape) < 0.5, -10.0, 10.0))
    reg.eval()
    exports = []
    for _ in range(3):
        t0 = time.perf_counter()
        reg.prune(shrink=True)
        exports.append(time.perf_counter() - t0)
    results["ResNet-18 export"] = {"prune(shrink=True)": statistics.median(exports)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the wrapper")
    ap.add_argument("--families", action="store_true", help="the graph families and the export")
    ap.add_argument("--only", help="with --families: the families whose name contains this")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 keeps the ratios stable "
                         "on a machine shared with other work")  # fmt: skip
    ap.add_argument("--mode", choices=["default", "tuned"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode:
        if args.mode == "tuned":
            from l0core.cpu import tune_allocator

            tune_allocator()
        if args.families:
            print(json.dumps(measure_families(args.rounds, args.steps, args.only)))
        else:
            print(json.dumps(measure(args.rounds, args.steps, args.compile)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 128, "
          f"median of {args.rounds} rounds x {args.steps} steps\n")  # fmt: skip
    print("| model | configuration | allocator | step (ms) | ratio to plain |")
    print("|---|---|---|---:|---:|")
    for mode in ("default", "tuned"):
        cmd = [sys.executable, __file__, "--mode", mode, "--rounds", str(args.rounds),
               "--steps", str(args.steps)] + (["--compile"] if args.compile else [])  # fmt: skip
        cmd += ["--families"] if args.families else []
        cmd += ["--only", args.only] if args.only else []
        cmd += ["--threads", str(args.threads)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        for model_name, row in res.items():
            for name, t in row.items():
                ratio = f"{t / row['plain']:.2f}x" if "plain" in row else "-"
                print(f"| {model_name} | {name} | {mode} | {t * 1e3:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
