"""The subprocess memory probe of the cost study returns a real, positive reading."""

from clusterformers.contrastive.cost import maxrss_increase


def test_maxrss_increase_grows_with_the_batch() -> None:
    small = maxrss_increase("fare", 256)
    large = maxrss_increase("fare", 2048)
    assert small > 0
    assert large > small  # FARE's b×b attention: 64× the entries at 8× the batch
