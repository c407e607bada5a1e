import logging
import os
import sys

from .cli import main

code = main()
if code in (0, None) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker whose work is done (files written, process group destroyed) leaves without the
    # interpreter's teardown: gloo's worker threads may still be releasing the last collectives' tensors, which
    # takes the GIL; during finalization that thread exits through C++ frames and the process aborts
    # ("terminate called without an active exception", SIGABRT, torchrun reports the run failed). Seen in 5 of
    # ~25 two-process runs under load, before and after 2026-11-29's changes; the core dump's aborting thread was
    # ProcessGroupGloo::runLoop destroying an AsyncBarrierWork. PyTorch's own fix (an atexit
    # destroy_process_group, pytorch/pytorch#179291) was abandoned.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
raise SystemExit(code)
