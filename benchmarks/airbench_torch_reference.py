"""The airbench94 recipe in PyTorch, on gbjax's CIFAR-10: a check of our JAX version.

    pip install 'gbjax[bench]'   # torch
    python benchmarks/airbench_torch_reference.py --data-dir ../shared/data --json out.json

Written from the published description (K. Jordan, 2024), like
``gbjax/configs/airbench_cifar10.py`` but independently of it: same data (our
JPEG CIFAR-10, loaded with ``gbjax.data.load``), network, optimiser groups,
schedule, lookahead, augmentation and TTA. If the two reach the same accuracy on
the same data, a gap to the published 94% comes from the data, not from our
implementation. CPU, float32, channels-last; about 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gbjax

MOMENTUM, BATCH, LR_PER_1024, WD_PER_1024, BIAS_SCALER = 0.85, 1024, 11.5, 0.0153, 64.0


class BN(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c, eps=1e-12, momentum=1 - 0.6)  # running = 0.6 old + 0.4 batch
        self.weight.requires_grad = False  # scale frozen at 1


class Conv(nn.Conv2d):
    def __init__(self, cin, cout):
        super().__init__(cin, cout, 3, padding="same", bias=False)
        with torch.no_grad():  # identity on the first cin filters
            w = self.weight
            n = min(cin, cout)
            w[:n].zero_()
            w[torch.arange(n), torch.arange(n), 1, 1] = 1.0


class Group(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1, self.norm1 = Conv(cin, cout), BN(cout)
        self.conv2, self.norm2 = Conv(cout, cout), BN(cout)

    def forward(self, x):
        x = F.gelu(self.norm1(F.max_pool2d(self.conv1(x), 2)))
        return F.gelu(self.norm2(self.conv2(x)))


class Net(nn.Module):
    def __init__(self, widths=(64, 256, 256)):
        super().__init__()
        self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False
        nn.init.zeros_(self.whiten.bias)
        self.groups = nn.Sequential(Group(24, widths[0]), Group(widths[0], widths[1]),
                                    Group(widths[1], widths[2]))  # fmt: skip
        self.head = nn.Linear(widths[2], 10, bias=False)

    def forward(self, x):
        x = self.groups(F.gelu(self.whiten(x)))
        return self.head(F.max_pool2d(x, 3).flatten(1)) / 9


def whiten_init(layer, x, eps=5e-4):
    """Eigenvectors of the 2x2 patch second moment over sqrt(lambda + eps), and negatives."""
    p = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12).double()
    lam, vec = torch.linalg.eigh(p.T @ p / len(p))
    lam, vec = lam.flip(0), vec.flip(1)
    w = (vec / torch.sqrt(lam + eps)).T.reshape(12, 3, 2, 2).float()
    with torch.no_grad():
        layer.weight.copy_(torch.cat([w, -w]))


def tta_logits(net, x):
    def mirror(v):
        return 0.5 * net(v) + 0.5 * net(v.flip(-1))

    pad = F.pad(x, (1,) * 4, mode="reflect")
    shifted = 0.5 * mirror(pad[:, :, 0:32, 0:32]) + 0.5 * mirror(pad[:, :, 2:34, 2:34])
    return 0.5 * mirror(x) + 0.5 * shifted


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=float, default=9.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(torch.get_num_threads())
    xtr, ytr = gbjax.data.load("cifar10", "train", data_dir=args.data_dir, progress=False)
    xte, yte = gbjax.data.load("cifar10", "test", data_dir=args.data_dir, progress=False)
    to = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).float() / 255  # noqa: E731
    xtr, xte = to(xtr), to(xte)
    mean, std = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    ytr, yte = torch.from_numpy(np.asarray(ytr)).long(), torch.from_numpy(np.asarray(yte)).long()

    t0 = time.perf_counter()
    net = Net().to(memory_format=torch.channels_last)
    whiten_init(net.whiten, xtr[torch.randperm(len(xtr))[:5000]])
    kilostep = 1024 * (1 + 1 / (1 - MOMENTUM))
    lr, wd = LR_PER_1024 / kilostep, WD_PER_1024 * BATCH / kilostep
    norm_biases = [q for n, q in net.named_parameters() if "norm" in n and q.requires_grad]
    others = [q for n, q in net.named_parameters() if "norm" not in n and q.requires_grad]
    lr_b = lr * BIAS_SCALER
    groups = [dict(params=norm_biases, lr=lr_b, weight_decay=wd / lr_b),
              dict(params=others, lr=lr, weight_decay=wd / lr)]  # fmt: skip
    opt = torch.optim.SGD(groups, momentum=MOMENTUM, nesterov=True)
    steps_per_epoch = len(xtr) // BATCH
    total = math.ceil(steps_per_epoch * args.epochs)
    warm = int(total * 0.23)

    def factor(step):
        if step < warm:
            return 0.2 + 0.8 * step / warm
        return 1.0 + (0.07 - 1.0) * (step - warm) / (total - warm)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    ema = {k: v.clone() for k, v in net.state_dict().items()}
    alpha = 0.95**5 * (torch.arange(total + 1) / total) ** 3
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")
    flip_base = torch.rand(len(xtr)) < 0.5
    padded = F.pad(
        torch.where(flip_base.view(-1, 1, 1, 1), xtr.flip(-1), xtr), (2,) * 4, mode="reflect"
    )
    step, curve = 0, []
    for epoch in range(math.ceil(args.epochs)):
        net.whiten.bias.requires_grad = epoch < 3
        net.train()
        sh = torch.randint(0, 5, (len(xtr), 2))  # per-image translation by -2..2
        rows = torch.arange(32).view(1, 32, 1) + sh[:, 0].view(-1, 1, 1)
        cols = torch.arange(32).view(1, 1, 32) + sh[:, 1].view(-1, 1, 1)
        images = padded[torch.arange(len(xtr)).view(-1, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
        if epoch % 2 == 1:
            images = images.flip(-1)
        perm = torch.randperm(len(xtr))
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            xb = images[idx].contiguous(memory_format=torch.channels_last)
            loss = loss_fn(net(xb), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 5 == 0 or step == total:
                d = alpha[step].item() if step % 5 == 0 else 1.0
                with torch.no_grad():
                    for e, v in zip(ema.values(), net.state_dict().values()):
                        if v.dtype.is_floating_point:
                            e.lerp_(v, 1 - d)
                            v.copy_(e)
            if step >= total:
                break
        net.eval()
        with torch.no_grad():
            acc = float(sum((net(xte[j : j + 1000]).argmax(1) == yte[j : j + 1000]).sum()
                            for j in range(0, len(xte), 1000))) / len(xte)  # fmt: skip
        curve.append(dict(epoch=min(epoch + 1, args.epochs), test_accuracy=acc,
                          elapsed_s=time.perf_counter() - t0))  # fmt: skip
        print(curve[-1], flush=True)
    with torch.no_grad():
        tta = float(sum((tta_logits(net, xte[j : j + 1000]).argmax(1) == yte[j : j + 1000]).sum()
                        for j in range(0, len(xte), 1000))) / len(xte)  # fmt: skip
    out = dict(test_accuracy_tta=tta, test_accuracy=curve[-1]["test_accuracy"], steps=total,
               epochs=args.epochs, seed=args.seed, curve=curve, torch=torch.__version__,
               wall_s=time.perf_counter() - t0)  # fmt: skip
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
