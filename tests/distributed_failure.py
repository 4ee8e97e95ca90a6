"""`python -m tarflow_ref`, except that rank 1 fails at the second training step: a real exception
in one process of a torchrun job (tests/test_distributed.py starts this script under torchrun).
Only this test script patches the code; the product has no hook for it."""
import os
import sys

from tarflow_ref.cli import main
from tarflow_ref.training import train

if os.environ.get("RANK") == "1":
    real_batch = train.training_batch

    def failing_batch(images, labels, s, step):
        if step == 1:
            raise RuntimeError("rank 1 failed on purpose at step 1")
        return real_batch(images, labels, s, step)

    train.training_batch = failing_batch

main(sys.argv[1:])
