"""``python app.py``: the browser app (upload photos → train a DoRA adapter → generate with it).

An entry point only: the page is built in ``dreambooth_dora/app/`` (server.py, one module per tab). The CPU
threading policy is set here, before gradio and torch load (see dreambooth_dora/threads.py).

    python app.py [--host 127.0.0.1] [--port 7860] [--auth USER:PASS] [--share] [--base MODEL] [--data-dir DIR]
                  [--threads N]
"""

import sys

from dreambooth_dora import notices, threads

if __name__ == "__main__":
    threads.configure(threads.requested(sys.argv))
    notices.quiet()
    from dreambooth_dora.app.server import main

    sys.exit(main())
