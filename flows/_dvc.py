"""The one Prefect task every flow uses: `dvc repro <target>`, streamed into the run logger.

Why a subprocess and not the stage's run() in-process: DVC stays the only writer of data/, models/ and
reports/, so dvc.lock never disagrees with the files, finished stages are skipped (that is the resume),
and each stage gets a fresh process (model memory is freed before the next one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

# A stage that exits 2 raised a UserError (bad params, missing model): running it again cannot help.
_USER_ERROR = re.compile(r"exited with 2\b")
_ERROR_PREFIXES = ("error:", "ERROR:")
RETRY_DELAY_S = int(os.environ.get("OEL_RETRY_DELAY_S", "10"))


class StageFailed(RuntimeError):
    """`dvc repro <target>` failed; str() is `<target> failed: <the stage's own error line>`."""

    def __init__(self, target: str, line: str, transient: bool) -> None:
        super().__init__(f"{target} failed: {line}")
        self.target = target
        self.transient = transient


def dvc_bin() -> str:
    # The dvc beside this interpreter, so a served flow does not depend on the caller's PATH.
    here = Path(sys.executable).with_name("dvc")
    return str(here) if here.exists() else "dvc"


def stream(cmd: list[str], cwd: Path, on_line: Callable[[str], None], keep: int = 200) -> tuple[int, list[str]]:
    """Run cmd, hand each output line to on_line as it arrives; return (exit code, last `keep` lines)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # stage logs arrive line by line, not at exit
    tail: deque[str] = deque(maxlen=keep)
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            on_line(line)
        return proc.wait(), list(tail)


def error_line(lines: list[str]) -> str:
    """The most telling line: the stage's own `error:` line, else the last exception line, else DVC's."""
    stripped = [ln.strip() for ln in lines if ln.strip()]
    for pick in (_stage_error, _exception_line, _dvc_error):
        found = pick(stripped)
        if found:
            return found
    return stripped[-1] if stripped else "no output"


def _stage_error(lines: list[str]) -> str | None:
    return next((ln for ln in reversed(lines) if ln.startswith("error:")), None)


def _exception_line(lines: list[str]) -> str | None:
    if not any(ln.startswith("Traceback (most recent call last)") for ln in lines):
        return None
    return next((ln for ln in reversed(lines) if re.match(r"^[\w.]+(Error|Exception|Exit)\b", ln)), None)


def _dvc_error(lines: list[str]) -> str | None:
    return next((ln for ln in reversed(lines) if ln.startswith(_ERROR_PREFIXES)), None)


def is_transient(lines: list[str]) -> bool:
    return not any(_USER_ERROR.search(ln) for ln in lines)


def _retry_if_transient(task, task_run, state) -> bool:
    exc = getattr(state, "data", None)
    return not isinstance(exc, StageFailed) or exc.transient


def repro(target: str, root: str | Path = ".") -> None:
    """`dvc repro <target>` in the project root, every line into the Prefect run logger.

    Not `--single-item`: DVC re-runs a stale upstream stage first (e.g. an edited distill.* in an
    earlier round), which keeps dvc.lock consistent. Flows call stages in pipeline order, so in the
    usual case each call runs exactly its own stage.
    """
    log = get_run_logger()
    rc, lines = stream([dvc_bin(), "repro", target], Path(root), log.info)
    if rc != 0:
        raise StageFailed(target, error_line(lines), is_transient(lines))


# NO_CACHE: DVC already skips finished stages by content hash; a second cache could only disagree.
dvc_repro = task(repro, name="dvc-repro", task_run_name="{target}", cache_policy=NO_CACHE, retries=1,
                 retry_delay_seconds=RETRY_DELAY_S, retry_condition_fn=_retry_if_transient)
