"""Where the U-Net's convolution time goes: per pass and oneDNN kernel, float32 against mixed bfloat16.

    python benchmarks/convs.py                 # base 16, batch 8, 256 x 128
    python benchmarks/convs.py --base 64

Trains train.py's model (as bench.py builds it) for a few steps in a child process per precision with
ONEDNN_VERBOSE=1, and sums oneDNN's own execution times of the convolution primitives over the timed
steps, by pass (forward, backward data, backward weights) and kernel. This is what explains the
bfloat16/float32 training ratio at base 16 (README, Performance). The verbose log slows every primitive
a little; compare the two precisions, not these times with bench.py's.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSES = {"forward_training": "forward", "backward_data": "backward data", "backward_weights": "backward weights"}
MARK = "---timed steps---"

CHILD = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
import numpy as np
import bench
model = bench.build_model({base}, {precision!r})
rng = np.random.default_rng(0)
x = rng.random((8 * {steps}, 256, 128, 1), np.float32)
y = rng.integers(0, 6, (8 * {steps}, 256, 128, 1)).astype(np.uint8)
model.fit(x[:24], y[:24], batch_size=8, epochs=1, verbose=0)  # warm-up: tracing, oneDNN primitive creation
print({mark!r}, flush=True)
model.fit(x, y, batch_size=8, epochs=1, verbose=0)
print({mark!r}, flush=True)
"""


def conv_times(base: int, precision: str, steps: int) -> dict:
    """{(pass, kernel): ms per step} of the convolution primitives over `steps` training steps."""
    code = CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), base=base, precision=precision,
                        steps=steps, mark=MARK)
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    timed = out.split(MARK)[1]  # between the two marks
    ms = collections.Counter()
    for line in timed.splitlines():
        f = line.split(",")
        if len(f) > 8 and f[:6] == ["onednn_verbose", "v1", "primitive", "exec", "cpu", "convolution"]:
            ms[(PASSES.get(f[7], f[7]), f[6])] += float(f[-1]) / steps
    return dict(ms)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=16, help="filters of the first level")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after 3 of warm-up)")
    args = p.parse_args(argv)
    res = {prec: conv_times(args.base, prec, args.steps) for prec in ("float32", "mixed_bfloat16")}
    print(f"Convolutions of one training step, base {args.base}, batch 8, 256 x 128: oneDNN's execution time, "
          f"ms per step (mean of {args.steps} steps)\n")
    print("| pass | float32 | mixed_bfloat16 | ratio | kernels: float32 / mixed_bfloat16 |")
    print("|---|---|---|---|---|")
    totals = {}
    for name in [*PASSES.values()]:
        t = {prec: sum(v for (pas, _), v in r.items() if pas == name) for prec, r in res.items()}
        kernels = {prec: ", ".join(sorted({k for (pas, k) in r if pas == name})) for prec, r in res.items()}
        totals[name] = t
        print(f"| {name} | {t['float32']:.1f} | {t['mixed_bfloat16']:.1f} | "
              f"{t['float32'] / max(t['mixed_bfloat16'], 1e-9):.2f}x | {kernels['float32']} / {kernels['mixed_bfloat16']} |")
    f32, bf16 = (sum(t[prec] for t in totals.values()) for prec in ("float32", "mixed_bfloat16"))
    print(f"| all convolutions | {f32:.1f} | {bf16:.1f} | {f32 / max(bf16, 1e-9):.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
