"""``python -m dreambooth_dora.analysis``: the ΔM/ΔD analysis of runs. An entry point only: the code lives in
``dreambooth_dora.tools.analysis``; this module keeps the command (and the names scripts import from it)."""

import sys

from dreambooth_dora.tools.analysis import AnalysisError, analyze_runs, decomposition_stats, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
