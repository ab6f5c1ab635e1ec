"""A knob sweep two ways, side by side on one machine: re-attaching the concept for every setting (what the
benchmark worker did before issue 16) vs attaching once and changing the knob in place (``Attachment.set``).

Times only the switch between settings (no image generation), on a Perfusion concept trained two steps on
the chosen base. Prints seconds per switch for both and their ratio.

    python benchmarks/knob_sweep.py [--base toy] [--settings 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="toy")
    parser.add_argument("--settings", type=int, default=20)
    args = parser.parse_args()

    import torch

    from personalize import attach, load_base
    from personalize.claims import train_toy_concept

    torch.manual_seed(0)
    pipe = load_base(args.base)
    betas = [0.5 + 0.3 * i / max(1, args.settings - 1) for i in range(args.settings)]
    with tempfile.TemporaryDirectory() as tmp:
        path = train_toy_concept(pipe, "striped_star", Path(tmp) / "c.safetensors", steps=2, batch_size=2)
        attach(pipe, path).detach()  # warm caches (covariance file, tokenizer copies)

        began = time.perf_counter()
        for beta in betas:
            attach(pipe, path, beta=beta).detach()
        reattach = (time.perf_counter() - began) / len(betas)

        began = time.perf_counter()
        with attach(pipe, path) as handle:
            for beta in betas:
                handle.set(beta=beta)
        in_place = (time.perf_counter() - began) / len(betas)
    print(f"base={args.base} settings={len(betas)} threads={torch.get_num_threads()}")
    print(f"re-attach per setting: {reattach * 1000:.1f} ms")
    print(f"handle.set per setting (one attach amortised): {in_place * 1000:.2f} ms")
    print(f"ratio: {reattach / in_place:.0f}x")


if __name__ == "__main__":
    main()
