"""Packages from the folder mapping (DESIGN.md §1), found, never listed by hand.

The import names differ from the folder names (``platform/hybridlab`` is ``hybridlab``,
``arch`` is ``hybridlab.arch``, ...), so setuptools' automatic discovery cannot name them;
here every folder with an ``__init__.py`` below a mapped root is a package, named by the
mapping. A new subpackage (``kernels/<op>/``, ``arch/<part>/``) is in the next wheel without
an edit here. Metadata and dependencies live in pyproject.toml.
"""

from setuptools import find_packages, setup

PACKAGE_DIR = {
    "hybridlab": "platform/hybridlab",
    "hybridlab.arch": "arch",
    "hybridlab.kernels": "kernels",
    "hybridlab.jobs": "jobs",
}
PACKAGE_DATA = {"hybridlab.arch": ["zoo/*.yaml"], "hybridlab.jobs": ["recipes/*.yaml"]}


def mapped_packages(package_dir: dict = PACKAGE_DIR) -> list:
    found = set()
    for name, folder in package_dir.items():
        found.add(name)
        found.update(f"{name}.{sub}" for sub in find_packages(where=folder))
    return sorted(found)


if __name__ == "__main__":
    setup(package_dir=PACKAGE_DIR, packages=mapped_packages(), package_data=PACKAGE_DATA, include_package_data=False)
