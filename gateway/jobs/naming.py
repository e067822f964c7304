"""The names of the objects a job stores, written once: the writers (job creation, the run), the storage sweep
and the image route all use this module, so a name one of them writes is a name the others recognise.

`<job id>_input.<ext>` is the stored copy of the input (`<job id>_mask.<ext>` a masked edit's mask), and
`<job id>_<i>_<token>.<ext>` output `i` of a run, `token` 128 random bits drawn for that run: an output URL is a
capability (served to any holder), so its name must not follow from the job id, which logs and headers carry.
Each run draws its own token, so an earlier run that finishes late cannot touch the winner's images. Outputs
stored before tokens were named `<job id>_<i>` and `<job id>_<i>_run<r>` (still recognised). Extensions are those
of the stored formats (`gateway.media.storage`).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from gateway.media.storage import CONTENT_TYPES

_EXTENSIONS = "|".join(re.escape(extension) for extension in CONTENT_TYPES)
_JOB_ID = r"[A-Za-z0-9_-]+?"
OUTPUT_TOKEN_BYTES = 16
_TOKEN = rf"[0-9a-f]{{{2 * OUTPUT_TOKEN_BYTES}}}"
_STORED_NAME = re.compile(
    rf"^(?P<job_id>{_JOB_ID})_(?:(?P<input>input|mask)|(?P<index>\d+)(?:_run(?P<run>\d+)|_(?P<token>{_TOKEN}))?)"
    rf"\.(?:{_EXTENSIONS})$"
)


def input_name(job_id: str, extension: str) -> str:
    """The stored copy of a job's input."""
    return f"{job_id}_input.{extension}"


def mask_name(job_id: str, extension: str) -> str:
    """The stored copy of a masked edit's mask (an input: served only to the job's owner, like the image)."""
    return f"{job_id}_mask.{extension}"


def new_output_token() -> str:
    """A run's token: what makes its output names unguessable."""
    return secrets.token_hex(OUTPUT_TOKEN_BYTES)


def output_name(job_id: str, index: int, run: int = 1, extension: str = "png", *, token: str | None = None) -> str:
    """Output `index` of a run whose token is `token` (what the executor writes); without one, the name an output
    of the job's `run`-th run had before tokens (read back from old rows; fakes). The extension is the output
    format's (it carries the stored object's content type)."""
    if token is not None:
        return f"{job_id}_{index}_{token}.{extension}"
    return f"{job_id}_{index}.{extension}" if run <= 1 else f"{job_id}_{index}_run{run}.{extension}"


@dataclass(frozen=True)
class StoredName:
    job_id: str
    is_input: bool


def parse_name(name: str) -> StoredName | None:
    """Whose object `name` is, and whether it is an input; None for a name no job writes."""
    match = _STORED_NAME.fullmatch(name)
    if match is None:
        return None
    return StoredName(match.group("job_id"), match.group("input") is not None)
