"""Print the pip requirements of pyproject.toml (runtime plus the named extras), one per line.

The virtualenv holds only the dependencies; the package itself runs from the checkout (PYTHONPATH),
so one environment serves every clone with the same dependency spec.
Usage: python .ci/requirements.py [extra ...]
"""
import sys
import tomllib

with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
for extra in sys.argv[1:]:
    reqs += project["optional-dependencies"][extra]
print("\n".join(dict.fromkeys(reqs)))
