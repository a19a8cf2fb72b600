"""Short seeded fuzz runs (CI) and the replay of every saved crashing input.

The long runs are `mcloudtt-fuzz codec --inputs 1000000` and friends (see loadtest/README.md).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from mcloudtt_loadtest import fuzz

CRASHERS = Path(__file__).parent / "crashers"


def test_codec_short_seeded_run(tmp_path: Path) -> None:
    result = fuzz.fuzz_in_process("codec", 10_000, seed=13, crashers=tmp_path)
    assert result.inputs == 10_000
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]


def test_core_short_seeded_run(tmp_path: Path) -> None:
    result = fuzz.fuzz_in_process("core", 10_000, seed=13, crashers=tmp_path)
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]


def test_cluster_short_seeded_run(tmp_path: Path) -> None:
    """Two cores on an in-memory bus: session handovers and forwarded publishes fuzzed too."""
    result = fuzz.fuzz_in_process("cluster", 3_000, seed=13, crashers=tmp_path)
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]


def test_live_short_seeded_run(tmp_path: Path) -> None:
    result = fuzz.fuzz_live(300, seed=13, crashers=tmp_path, batch=50)
    assert result.inputs == 300
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]


def test_live_with_every_limit_on(tmp_path: Path) -> None:
    """The shell's limit paths (reading paused and resumed, refusals) under hostile input."""
    limits = "--publish-rate 20 --publish-burst 5 --bandwidth 3000 --max-subscriptions 2"
    limits += " --max-topic-levels 3 --max-topic-length 40 --max-connections 60"
    limits += " --max-listener-connections 60 --connect-rate 500"
    result = fuzz.fuzz_live(200, seed=17, crashers=tmp_path, broker_args=limits.split())
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]


def test_the_mutations_reach_deep_into_the_core() -> None:
    """Without this the core run would prove little: most inputs must get past CONNECT."""
    rng = random.Random(5)
    seeds = fuzz.seed_corpus(rng)
    target = fuzz.CoreTarget(renew=10**9)
    for _ in range(2000):
        data = fuzz.mutate(seeds, rng)
        target.run(data, random.Random(data))
    assert target.broker is not None
    stats = target.broker.stats
    assert stats.connections_total > 1000
    assert min(stats.messages_received) > 300  # every QoS
    assert 500 < stats.protocol_errors < 2000  # mutations do hit the error path, not always


def test_a_run_is_reproducible_from_its_seed() -> None:
    a, b = random.Random(9), random.Random(9)
    seeds_a, seeds_b = fuzz.seed_corpus(a), fuzz.seed_corpus(b)
    assert [fuzz.mutate(seeds_a, a) for _ in range(200)] == [
        fuzz.mutate(seeds_b, b) for _ in range(200)
    ]


def test_a_crashing_input_is_saved(tmp_path: Path) -> None:
    def brittle(data: bytes, rng: random.Random) -> None:
        if data[:1] == b"\x10" and len(data) % 7 == 0:
            raise IndexError("found one")

    result = fuzz.fuzz_in_process("core", 500, seed=1, crashers=tmp_path, run=brittle)
    assert result.crashes
    saved = result.crashes[0]
    assert saved.name.startswith("core-") and saved.suffix == ".bin"
    assert "IndexError: found one" in saved.with_suffix(".txt").read_text()
    with pytest.raises(IndexError):
        brittle(saved.read_bytes(), random.Random(0))


@pytest.mark.parametrize(
    "path", sorted(CRASHERS.glob("*.bin")), ids=lambda p: p.name if isinstance(p, Path) else p
)
def test_saved_crasher_no_longer_crashes(path: Path) -> None:
    """Every input that once crashed (tests/fuzz/crashers/), replayed against its target."""
    data = path.read_bytes()
    target = path.name.split("-")[0]
    if target == "codec":
        fuzz.run_codec(data, random.Random(data))
    elif target == "core":
        fuzz.run_core(data, random.Random(data))
    elif target == "cluster":
        fuzz.run_cluster(data, random.Random(data))
    else:
        # A live batch: its streams replayed against a fresh broker.
        from mcloudtt_chaos.procs import Process, console_script, free_port

        port = free_port()
        with Process(
            [*console_script("mcloudtt-broker", "mcloudtt_broker"), "--bind", f"127.0.0.1:{port}"],
            port=port,
        ) as broker:
            broker.start().wait_port(timeout=20)
            fuzz.send_streams(port, fuzz.unpack_streams(data), random.Random(0))
            assert broker.alive()
            fuzz.paho_check(port)


# ------------------------------------------------------------------- atheris (coverage-guided)

needs_atheris = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None, reason="atheris: Linux x86_64 CPython only"
)


@needs_atheris
def test_codec_short_seeded_atheris_run(tmp_path: Path) -> None:
    result = fuzz.fuzz_atheris("codec", 5_000, seed=13, crashers=tmp_path)
    assert result.inputs == 5_000
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]
    # The broker's modules are instrumented: libFuzzer sees their branches (a bare run sees ~0).
    assert result.coverage > 200 and result.features > result.coverage


@needs_atheris
def test_core_short_seeded_atheris_run(tmp_path: Path) -> None:
    result = fuzz.fuzz_atheris("core", 3_000, seed=13, crashers=tmp_path)
    assert result.inputs == 3_000
    assert result.crashes == [], [p.with_suffix(".txt").read_text() for p in result.crashes]
    assert result.coverage > 500  # well past CONNECT: subscriptions, flows, limits


@needs_atheris
def test_an_atheris_crash_is_saved_for_the_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted bug (a target of one's own, in a module the subprocess imports): libFuzzer finds
    it, the input lands in the crashers folder under the replay test's naming."""
    (tmp_path / "brittle_target.py").write_text(
        "def run(data, rng):\n"
        "    if len(data) == 3 and data[:1] == b'\\x10':\n"
        "        raise IndexError('found one')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    crashers = tmp_path / "crashers"
    result = fuzz.fuzz_atheris(
        "codec", 200_000, seed=3, crashers=crashers, run="brittle_target:run"
    )
    assert len(result.crashes) == 1
    saved = result.crashes[0]
    assert saved.name.startswith("codec-") and saved.suffix == ".bin"
    data = saved.read_bytes()
    assert len(data) == 3 and data[:1] == b"\x10"
    assert "IndexError: found one" in saved.with_suffix(".txt").read_text()
    assert result.inputs < 200_000  # libFuzzer stopped at the crash


def test_split_packets_cuts_where_the_fixed_headers_say() -> None:
    session = fuzz._packets(5, random.Random(1))
    assert fuzz.split_packets(b"".join(session)) == session
    assert fuzz.split_packets(session[0] + b"\x30\x05ab") == [session[0], b"\x30\x05ab"]
    assert fuzz.split_packets(b"") == [b""]
