"""Test-only fault injector: with CDMCTL_KILL_AT="module:attr.path:N" in the environment, the process sends
itself SIGKILL on the N-th call of that function, so a test can kill `cdmctl` at an exact point (a checkpoint
half staged, a resume half started) instead of at a moment a timer happens to hit.

Python imports this module at start-up when its folder is on PYTHONPATH; nothing else ever puts it there.
"""

import importlib
import os
import signal

_SPEC = os.environ.get("CDMCTL_KILL_AT")


def _arm(spec: str) -> None:
    module_name, path, nth = spec.split(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module_name)
    for attr in owners:
        owner = getattr(owner, attr)
    original, calls = getattr(owner, name), [0]

    def killing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, killing)


if _SPEC:
    _arm(_SPEC)
