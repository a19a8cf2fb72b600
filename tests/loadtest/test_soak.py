"""The soak in one minute: a 3-broker cluster with Redis under mixed load with reconnects.

Bound: the brokers' RSS, fitted by least squares after a 20 s warm-up, may grow by at most
1 MB per minute. Measured here: 0.0 KB/min (RSS flat to the page). The load is ~28,000 messages a
minute in and out (6 publishers at 20/s, 3 subscribers of everything), so a leak of ~40 bytes per
message would break the bound.
"""

from __future__ import annotations

import io

import pytest
from mcloudtt_loadtest.soak import slope_kb_per_minute, soak

MAX_SLOPE_KB_PER_MINUTE = 1024.0


def test_slope_is_least_squares_in_kb_per_minute() -> None:
    assert slope_kb_per_minute([(0.0, 0), (60.0, 1024 * 10)]) == pytest.approx(10.0)
    assert slope_kb_per_minute([(0.0, 5000), (30.0, 5000), (60.0, 5000)]) == 0.0
    # One outlier moves a least-squares fit less than an end-to-end difference would.
    noisy = [(float(t), 1024 * 100) for t in range(0, 60, 5)] + [(60.0, 1024 * 160)]
    assert 0 < slope_kb_per_minute(noisy) < 60.0
    assert slope_kb_per_minute([(1.0, 10)]) == 0.0


@pytest.mark.slow
@pytest.mark.timeout(240)
# paho leaves the socket pair of a stopped loop for the garbage collector (each reconnect stops
# and starts a client's loop): its ResourceWarning, not ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_one_minute_soak_memory_stays_flat_and_qos1_loses_nothing() -> None:
    out = io.StringIO()
    report = soak(60, interval=5, warmup=20, rate=20, reconnect_every=5, out=out)
    text = out.getvalue()
    assert "RSS slope after warm-up" in text
    for name in ("broker-1", "broker-2", "broker-3"):
        assert len(report.rss[name]) >= 10
        assert report.slopes[name] < MAX_SLOPE_KB_PER_MINUTE, (name, report.slopes, text)
    assert report.qos1_lost == 0, report.lost
    assert sum(report.published.values()) > 6000
    # Each interval had deliveries and its latency percentiles.
    assert all(row["n"] > 0 and row["p99_ms"] >= row["p50_ms"] for row in report.intervals[1:])
