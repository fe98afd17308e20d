"""One process of a multi-process test run: `python tests/multihost_worker.py MAIN-ARGS...`.

Runs `python -m bpo_jax.main MAIN-ARGS` after installing what tests/test_multihost.py observes,
into $BPO_TEST_LOG_DIR/process-I.jsonl (I = distributed.process_id):
- every file this process puts into place (rename) or opens for writing (an audit hook),
- how many prompts it tokenizes for sampling and how many rows of each global batch it builds,
- its peak resident memory, at exit (bench/multihost_scaling.py).
With $BPO_TEST_HOLD_AT_STEP = N, process 1 stops after saving the train checkpoint of step N,
writes $BPO_TEST_LOG_DIR/holding and waits there to be killed (a host dying mid-training).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ARGS = sys.argv[1:]
PROCESS = next((int(a.split("=")[1]) for a in ARGS if a.startswith("distributed.process_id=")), 0)
LOG_DIR = Path(os.environ["BPO_TEST_LOG_DIR"])
LOG = open(LOG_DIR / f"process-{PROCESS}.jsonl", "a", buffering=1)


def record(event: str, **fields) -> None:
    LOG.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")


def audit(event: str, args: tuple) -> None:
    if event == "os.rename":
        record("rename", path=os.fsdecode(args[1]))
    elif event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax") and isinstance(args[0], (str, bytes)):
        record("open", path=os.path.abspath(os.fsdecode(args[0])))


def install() -> None:
    import bpo_jax.sampling as sampling
    from bpo_jax.checkpointing import Checkpointer
    from bpo_jax.data.batching import PreferenceBatcher

    encode = sampling.encode_prompts

    def encode_prompts(texts, rendered, tokenizer):
        record("tokenize_prompts", n=len(texts))
        return encode(texts, rendered, tokenizer)

    sampling.encode_prompts = encode_prompts

    batch_at = PreferenceBatcher.batch_at

    def recorded_batch_at(self, epoch, position):
        batch = batch_at(self, epoch, position)
        record("batch", shuffle=self.shuffle, rows=len(batch["valid"]), global_rows=self.global_batch_size,
               process_count=self.process_count)
        return batch

    PreferenceBatcher.batch_at = recorded_batch_at

    hold = os.environ.get("BPO_TEST_HOLD_AT_STEP")
    save = Checkpointer.save

    def save_then_hold(self, step, state, data_state=None):
        save(self, step, state, data_state)
        if hold and PROCESS == 1 and int(hold) == step and self.directory.parts[-2:] == ("train", "checkpoints"):
            self.wait()
            (LOG_DIR / "holding").write_text(str(step))
            while True:
                time.sleep(1)

    Checkpointer.save = save_then_hold


def peak_rss() -> None:
    import resource

    record("peak_rss", mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


if __name__ == "__main__":
    import atexit

    atexit.register(peak_rss)
    sys.addaudithook(audit)
    install()
    from bpo_jax.main import main

    sys.exit(main(ARGS))
