"""Test-only fault injector: the process hits a fault on the N-th call of a named function, so a test can fail
`cdmctl` at an exact point (a checkpoint half staged, a resume half started) instead of at a moment a timer hits.

    CDMCTL_KILL_AT="module:attr.path:N"            SIGKILL itself on the N-th call (as CDMCTL_FAULT="kill@...")
    CDMCTL_FAULT="KIND@module:attr.path:N[:RANK]"  from the N-th call on (kill/raise/enospc: once, at the N-th);
                                                   only in the process whose RANK is RANK, when given. KIND:
      kill    SIGKILL this process
      raise   raise RuntimeError("injected fault")
      enospc  raise OSError(ENOSPC), as a full disk does
      hang    sleep for an hour (a rank that stops answering without dying)
      nan     call through, then multiply the first tensor of the result by nan (a loss gone non-finite)

Python imports this module at start-up when its folder is on PYTHONPATH; nothing else ever puts it there.
"""

import errno
import importlib
import os
import signal
import time


def _poisoned(result):
    """`result` (a tensor, or a tuple/list starting with one) with its first tensor times nan."""
    if isinstance(result, (tuple, list)):
        return type(result)([_poisoned(result[0]), *result[1:]])
    return result * float("nan")


def _arm(kind: str, spec: str) -> None:
    module_name, path, nth, *rank = spec.split(":")
    if rank and os.environ.get("RANK", "0") != rank[0]:
        return
    *owners, name = path.split(".")
    owner = importlib.import_module(module_name)
    for attr in owners:
        owner = getattr(owner, attr)
    original, calls = getattr(owner, name), [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == int(nth) and kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if calls[0] == int(nth) and kind == "raise":
            raise RuntimeError(f"injected fault in {module_name}:{path}")
        if calls[0] == int(nth) and kind == "hang":
            time.sleep(3600)
        if calls[0] == int(nth) and kind == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        result = original(*args, **kwargs)
        return _poisoned(result) if kind == "nan" and calls[0] >= int(nth) else result

    setattr(owner, name, faulty)


if os.environ.get("CDMCTL_KILL_AT"):
    _arm("kill", os.environ["CDMCTL_KILL_AT"])
if os.environ.get("CDMCTL_FAULT"):
    _arm(*os.environ["CDMCTL_FAULT"].split("@", 1))
