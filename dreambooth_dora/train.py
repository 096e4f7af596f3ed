"""``python -m dreambooth_dora.train``: the headless trainer. An entry point only: the code lives in
``dreambooth_dora.training.loop``; this module keeps the command (and the names scripts import from it)."""

import sys

from dreambooth_dora.training.loop import Callbacks, StepInfo, TrainingError, TrainResult, main, train  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
