"""The atheris (coverage-guided, libFuzzer) worker behind `mcloudtt-fuzz TARGET --engine atheris`.

Run as `python -m mcloudtt_loadtest.fuzz_atheris TARGET CRASHERS RUN LIBFUZZER-ARGS...` by
`fuzz.fuzz_atheris`, in its own process: libFuzzer takes the argv and ends the process itself.
RUN is `-` (TARGET's own target) or `module:function`, a target of one's own (tests plant a bug).

The broker's modules are imported under `atheris.instrument_imports`, so every branch of the codec
and the core feeds libFuzzer's coverage. The targets and oracles are those of `fuzz` (one home):
`run_codec` (only `ProtocolError` may leave the decoder; accepted packets survive a round trip)
and `CoreTarget.run` (nothing leaves `receive_data`; the output parses with the client codec; a
closed connection asked its shell to close), with an injected clock. The custom mutator mixes
libFuzzer's byte mutations with `fuzz.mutate`'s packet-aware ones (remaining lengths that lie,
packet types swapped, packets duplicated, dropped, reordered). A crashing input is saved into
CRASHERS under `fuzz.save_crasher`'s name, so `tests/fuzz/test_fuzz.py` replays it.
"""

from __future__ import annotations

import importlib
import random
import sys
import traceback
from pathlib import Path

import atheris

# Instrument the broker only (not the fuzzer, not the client codec used as the oracle).
with atheris.instrument_imports(include=["mcloudtt_broker"]):
    from mcloudtt_loadtest import fuzz


def main() -> None:
    target, crashers, spec = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    core = fuzz.CoreTarget(cluster=target == "cluster")
    run = fuzz.run_codec if target == "codec" else core.run
    if spec != "-":
        module, _, function = spec.partition(":")
        run = getattr(importlib.import_module(module), function)

    def one_input(data: bytes) -> None:
        try:
            # The chunking is seeded by the input, as in the mutation engine: a replay is identical.
            run(data, random.Random(data))
        except Exception as error:
            why = "".join(traceback.format_exception(error))
            path = fuzz.save_crasher(crashers, target, data, why)
            print(f"mcloudtt-fuzz: saved {path}", file=sys.stderr, flush=True)
            raise

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return bytes(atheris.Mutate(data, max_size))
        return fuzz.mutate([fuzz.split_packets(data)], rng)[:max_size]

    atheris.Setup([sys.argv[0], *sys.argv[4:]], one_input, custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
