"""Training and prediction speed of a plain PyTorch U-Net of the project's shape: the throughput peer.

    benchmarks/work/peer-venv/bin/python benchmarks/peers/torch_unet_speed.py --base-filters 16 --batch-size 8
    benchmarks/work/peer-venv/bin/python benchmarks/peers/torch_unet_speed.py --channels-last

The network is modules.build_unet's shape in PyTorch: 4 levels of two 3x3 convolutions with ReLU and batch
normalisation after the second, 2x2 max pooling, a 16f bottleneck, 2x2 transposed-convolution upsampling with
skip connections and a 1x1 output over the classes; Adam and a soft-Dice + cross-entropy loss, float32, on
random inputs (the speed does not depend on the values). `--channels-last` is what a speed-minded PyTorch
user sets on a CPU. Prints one JSON line: img/s of training steps and of prediction, after untimed warm-up
steps. Runs in the MONAI peer's environment (benchmarks/peers/env.py: torch 2.13.0, CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with ReLU, batch normalisation after the second (as modules.conv_block)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(cout))


class UNet(nn.Module):
    """modules.build_unet in PyTorch: widths f, 2f, 4f, 8f, bottleneck 16f."""

    def __init__(self, classes: int = 6, f: int = 16):
        super().__init__()
        widths = [f, 2 * f, 4 * f, 8 * f]
        self.down = nn.ModuleList(conv_block(i, o) for i, o in zip([1] + widths[:-1], widths))
        self.bottom = conv_block(widths[-1], 16 * f)
        self.up = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, 2, stride=2) for w in reversed(widths))
        self.merge = nn.ModuleList(conv_block(2 * w, w) for w in reversed(widths))
        self.out = nn.Conv2d(f, classes, 1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
            x = merge(torch.cat([up(x), skip], 1))
        return self.out(x)


def dice_ce(logits, labels):
    """Soft Dice per image and class plus cross-entropy, as the project's default loss."""
    probs = logits.softmax(1)
    onehot = nn.functional.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).float()
    inter, total = (probs * onehot).sum((2, 3)), (probs + onehot).sum((2, 3))
    return (1 - (2 * inter + 1) / (total + 1)).mean() + nn.functional.cross_entropy(logits, labels)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-f", "--base-filters", type=int, default=16)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--size", default="256x128", help="input ROWSxCOLS")
    p.add_argument("--classes", type=int, default=6)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--channels-last", action="store_true", help="torch.channels_last memory format")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    a = p.parse_args(argv)
    torch.manual_seed(42)
    torch.set_num_threads(a.threads)
    rows, cols = (int(s) for s in a.size.lower().split("x"))
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    model = UNet(a.classes, a.base_filters).to(memory_format=fmt)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(a.batch_size, 1, rows, cols).to(memory_format=fmt)
    y = torch.randint(0, a.classes, (a.batch_size, rows, cols))

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = dice_ce(model(x), y)
        loss.backward()
        optimizer.step()

    def predict():
        with torch.inference_mode():
            model(x).softmax(1)

    seconds = {}
    for name, call in (("train", step), ("predict", predict)):
        model.train(name == "train")
        for _ in range(a.warmup):
            call()
        start = time.perf_counter()
        for _ in range(a.steps):
            call()
        seconds[name] = (time.perf_counter() - start) / a.steps
    print(json.dumps({"peer": "torch_unet_speed", "torch": torch.__version__, "threads": a.threads,
                      "channels_last": a.channels_last, "base_filters": a.base_filters, "batch": a.batch_size,
                      "size": [rows, cols], "params": sum(q.numel() for q in model.parameters()),
                      "train_img_s": round(a.batch_size / seconds["train"], 2),
                      "predict_img_s": round(a.batch_size / seconds["predict"], 2), "steps": a.steps}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
