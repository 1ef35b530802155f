"""What every command line of mmjax shares: argparse errors in one line, exit code 2.

argparse prints its usage and then the error (two lines or more, the error not always
last); mmjax's commands promise one line naming the culprit. `invoked_as` is the name the
`mmjax` command ran this one under (e.g. 'mmjax train'), shown in help and errors instead
of the module's own 'python -m mmjax.train'.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

invoked_as: str | None = None


class ArgumentParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        prog = kwargs.get("prog")
        if invoked_as and prog and prog.startswith("python -m mmjax"):
            kwargs["prog"] = invoked_as
        kwargs.setdefault("allow_abbrev", False)  # --work must not mean --workdir
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")
