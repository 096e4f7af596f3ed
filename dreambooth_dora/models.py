"""``python -m dreambooth_dora.models``: write any base as a diffusers folder. An entry point only: the code lives in
``dreambooth_dora.sd.pipelines``; this module keeps the command (and the names scripts import from it)."""

import sys

from dreambooth_dora.sd.pipelines import (  # noqa: F401
    BUILTIN_NAMES,
    ModelLoadError,
    describe_architecture,
    export_base,
    load_pipeline,
    main,
)

if __name__ == "__main__":
    sys.exit(main())
