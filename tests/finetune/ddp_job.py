"""One rank of a data-parallel test run: ``python -m torch.distributed.run --nproc-per-node 2 ddp_job.py
CONFIG_JSON RECORD_DIR [--kill-rank R --kill-at K] [--resume]``.

Trains for real with ``finetune.train`` and records, per epoch, the training-image indices this rank read
(a spy around the augmentation's batch builder, which reads the pixels). ``--kill-rank``/``--kill-at``: that
rank SIGKILLs itself at its K-th batch boundary (the stop flag is asked once per batch), as the OOM killer
would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig
from finetune.loader import TrainAugment
from finetune.train import resume, train


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("config")
    p.add_argument("record_dir")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args(argv)
    rank = int(os.environ["RANK"])
    epochs: list[list[int]] = []
    real_batches, real_cpu_batch = TrainAugment.batches, TrainAugment._cpu_batch

    def batches(self: TrainAugment, *a: Any, **kw: Any) -> Iterator[Any]:
        epochs.append([])
        yield from real_batches(self, *a, **kw)

    def cpu_batch(self: TrainAugment, images: Any, buffers: Any, k: int, idx: Any, *rest: Any) -> Any:
        epochs[-1].extend(int(i) for i in idx)
        return real_cpu_batch(self, images, buffers, k, idx, *rest)

    TrainAugment.batches = batches  # type: ignore[method-assign]
    TrainAugment._cpu_batch = cpu_batch  # type: ignore[method-assign]
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        if rank == args.kill_rank and calls["n"] == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return False

    config = TrainConfig.from_dict(json.loads(Path(args.config).read_text()))
    result = resume(config.out, [], should_stop) if args.resume else train(config, [], should_stop)
    record = {"rank": rank, "epochs": epochs, "history": result.history}
    Path(args.record_dir, f"rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
