"""MONAI peer: a BasicUNet trained with DiceCE, Adam, z-scored input and MONAI's spatial and intensity augmentation.

    python benchmarks/peers/monai_unet.py --data DIR --out OUT.npz --classes C --epochs E \
        --batch-size B --base-filters F --seed S [--lr 1e-3]

DIR holds train.npz, validate.npz and test.npz (`images` float32 (n, H, W) at the scan's own intensities,
`labels` uint8 (n, H, W) in 0..C-1). Written the way MONAI's own tutorials do it (the BraTS and spleen
segmentation tutorials): NormalizeIntensity (z-score per image) before the network in training and
inference, random flips, rotations and zooms, random intensity scaling and shifts, DiceCE, Adam, the best
epoch by validation Dice; the library's defaults wherever the benchmark does not fix a setting.
Runs in its own venv (benchmarks/peers/env.py).
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np


from common import load_split, mean_foreground_dice, parse_args, save_result  # this folder


def main(argv=None) -> int:
    args = parse_args(__doc__.splitlines()[0], argv)
    splits = {name: load_split(args.data, name, args.classes) for name in ("train", "validate", "test")}

    # Imported after the inputs are checked: torch and MONAI take seconds to load.
    import torch
    from monai.data import DataLoader, Dataset, set_track_meta
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import (Compose, EnsureTyped, NormalizeIntensity, NormalizeIntensityd, RandFlipd,
                                  RandRotated, RandScaleIntensityd, RandShiftIntensityd, RandZoomd)
    from monai.utils import set_determinism

    set_determinism(seed=args.seed)  # seeds torch, numpy and random
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the cores this process may use
    set_track_meta(False)  # plain tensors out of the transforms: no metadata bookkeeping per batch

    f = args.base_filters
    # Five encoder widths (full resolution down to 1/16) and the width after the last upsampling:
    # f..16f per level like the project's U-Net.
    model = BasicUNet(spatial_dims=2, in_channels=1, out_channels=args.classes,
                      features=(f, 2 * f, 4 * f, 8 * f, 16 * f, f))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    keys = ["image", "label"]
    # Dictionary transforms draw once per sample and apply that draw to image and label alike.
    augment = Compose([
        EnsureTyped(keys=keys, data_type="tensor", dtype=torch.float32),
        NormalizeIntensityd(keys="image"),  # z-score of each image, MONAI's default settings
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),  # array axis 0 of (H, W): left-right
        RandRotated(keys=keys, range_x=np.deg2rad(10.0), prob=1.0, mode=("bilinear", "nearest")),
        RandZoomd(keys=keys, min_zoom=0.9, max_zoom=1.1, prob=1.0, mode=("bilinear", "nearest")),
        RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),  # as MONAI's BraTS tutorial
        RandShiftIntensityd(keys="image", offsets=0.1, prob=1.0),
    ])
    augment.set_random_state(seed=args.seed)
    images, labels = splits["train"]
    train_data = Dataset([{"image": x[None], "label": y[None]} for x, y in zip(images, labels)], transform=augment)
    loader = DataLoader(train_data, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))

    normalise = NormalizeIntensity()  # the same z-score as in training

    def predict(x: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(x), args.batch_size):
                batch = torch.stack([normalise(torch.from_numpy(img[None])) for img in x[i:i + args.batch_size]])
                logits = model(batch)
                out.append(torch.softmax(logits, dim=1).argmax(dim=1).numpy().astype(np.uint8))
        return np.concatenate(out)

    val_dice, best, best_state = [], -np.inf, None
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total, seen = 0.0, 0
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["label"])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch["image"])
            seen += len(batch["image"])
        dice = mean_foreground_dice(splits["validate"][1], predict(splits["validate"][0]), args.classes)
        val_dice.append(dice)
        if best_state is None or dice > best:  # a NaN Dice never wins over an earlier epoch
            best, best_epoch = dice, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"epoch {epoch}/{args.epochs}  loss {total / seen:.4f}  val_dice {dice:.4f}  "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
    seconds = time.perf_counter() - start

    model.load_state_dict(best_state)
    test_pred, val_pred = predict(splits["test"][0]), predict(splits["validate"][0])
    save_result(args.out, test_pred=test_pred, val_pred=val_pred, val_dice=np.array(val_dice, dtype=np.float64),
                best_epoch=np.int64(best_epoch), seconds=np.float64(seconds))
    print(f"best epoch {best_epoch} (val_dice {best:.4f}), {seconds:.1f}s training; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
