"""Worker of ``tests/test_reliability.py::test_reproduce_killed_at_random_points_gives_the_same_report``.

usage: python tests/reproduce_worker.py OUT_DIR

Runs a tiny elliptical study (ViT and LM cells, two worker processes) into OUT_DIR and writes its report, as
``clusterformers reproduce --paper elliptical`` does. The test kills it at random points and reruns it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from clusterformers.experiments import elliptical
from clusterformers.report import write_report


def tiny() -> elliptical.EllipticalConfig:
    vit = elliptical.VitStudy(arms=("softmax", "elliptical"), depth=2, dim=32, epochs=2, batch_size=256,
                              eval_images=64, noise_sigmas=(0.3,), attack_eps=(8,), pgd_steps=2, spsa_images=8,
                              spsa_eps=8, spsa_iters=2, spsa_samples=4)
    lm = elliptical.LmStudy(seeds=2, depth=2, dim=32, context=16, steps=24, batch_size=4, max_vocab=500,
                            max_chars=400_000, eval_tokens=2000)
    return elliptical.EllipticalConfig(vit, lm, seeds=(0, 1), workers=2, device="cpu")


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    write_report(out, elliptical.run(tiny(), out), header="# killed and rerun\n")
