"""The names of the objects a job stores, written once: the writers (job creation, the run), the storage sweep
and the image route all use this module, so a name one of them writes is a name the others recognise.

`<job id>_input.<ext>` is the stored copy of the input, `<job id>_<i>.<ext>` output `i` of the first run and
`<job id>_<i>_run<r>.<ext>` of run `r` (a re-run writes its own names, so an earlier run that finishes late
cannot touch the winner's images). Extensions are those of the stored formats (`gateway.media.storage`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.media.storage import CONTENT_TYPES

_EXTENSIONS = "|".join(re.escape(extension) for extension in CONTENT_TYPES)
_JOB_ID = r"[A-Za-z0-9_-]+?"
_STORED_NAME = re.compile(
    rf"^(?P<job_id>{_JOB_ID})_(?:(?P<input>input)|(?P<index>\d+)(?:_run(?P<run>\d+))?)\.(?:{_EXTENSIONS})$"
)


def input_name(job_id: str, extension: str) -> str:
    """The stored copy of a job's input."""
    return f"{job_id}_input.{extension}"


def output_name(job_id: str, index: int, run: int = 1, extension: str = "png") -> str:
    """Output `index` of the job's `run`-th run; the extension is the output format's (it carries the stored
    object's content type)."""
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
