"""One process of the distributed tests (tests/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_distributed_worker.py \
        train OUT SPEC...      train each spec into OUT/<i> (one process group for all)
    ... cli ARGS + ARGS        run `propdsl ARGS` for each `+`-separated command line
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from propdsl import distributed

    distributed.init_from_env()
    assert distributed.world() == 2, "the tests start two processes"
    try:
        if argv[0] == "train":
            import propdsl
            from propdsl.train import TrainOptions, train

            out = Path(argv[1])
            for i, spec_file in enumerate(argv[2:]):
                spec = propdsl.load(Path(spec_file))
                train(spec, TrainOptions(out=out / str(i), quiet=True))
            return 0
        if argv[0] == "cli":
            from propdsl.cli import app

            commands: list[list[str]] = [[]]
            for word in argv[1:]:
                if word == "+":
                    commands.append([])
                else:
                    commands[-1].append(word)
            for command in commands:
                try:
                    app(command, standalone_mode=False)
                except SystemExit as exc:
                    if exc.code:
                        return int(exc.code)
            return 0
        raise SystemExit(f"unknown mode {argv[0]!r}")
    except BaseException:
        distributed.shutdown()
        raise


if __name__ == "__main__":
    from propdsl import distributed
    from propdsl.cli import _leave_now

    code = main(sys.argv[1:])
    # As `propdsl.cli.main` ends a distributed command: the ranks meet at a barrier, then each
    # ends at once without tearing its group down (gloo's teardown aborted finished ranks).
    distributed.finish(ok=code == 0)
    _leave_now(code)
