"""The subprocess memory probe of the cost study returns a real, positive reading."""

from clusterformers.contrastive.cost import maxrss_increase


def test_maxrss_increase_grows_with_the_batch() -> None:
    small = maxrss_increase("fare", 256)
    large = maxrss_increase("fare", 2048)
    assert small >= 0  # a small step may stay under the peak that importing torch already set
    assert large > small + 50 * 2**20  # FARE's b×b attention at b=2048: well over 50 MiB above that
