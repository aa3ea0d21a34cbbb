"""``python -m shotdb ARGS``: the ``shotdb`` command line (docs/cli.md) with the same arguments.

The package holds the engine as a library, not the CLI program; this runs the ``shotdb``
executable named by $SHOTDB_CLI, or else the one on PATH (built by CMake as build/tools/shotdb),
replacing this process, so exit codes and output are the CLI's own.
"""
import os
import shutil
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cli = os.environ.get("SHOTDB_CLI") or shutil.which("shotdb")
    if not cli:
        sys.stderr.write(
            "python -m shotdb: no shotdb executable: set SHOTDB_CLI to it or put it on PATH "
            "(cmake -S . -B build && ninja -C build shotdb builds build/tools/shotdb; the Python "
            "package itself is the library: import shotdb)\n")
        return 2
    os.execv(cli, [cli] + list(argv))


if __name__ == "__main__":
    sys.exit(main())
