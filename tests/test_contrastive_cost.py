"""The subprocess memory probe of the cost study returns a real reading, also from a large parent process."""

import torch

from clusterformers.bench.cost import maxrss_increase


def test_maxrss_increase_grows_with_the_batch() -> None:
    ballast = torch.ones(100 * 2**20)  # 400 MiB resident in this process: a child's ru_maxrss would start here
    small = maxrss_increase("cclk", 256)
    large = maxrss_increase("cclk", 2048)
    del ballast
    assert small >= 0  # a small step may stay under the peak that importing torch already set
    assert large > small + 50 * 2**20  # CCLK's b×b matrices at b=2048: well over 50 MiB above that
