# The one place the version is written: pyproject.toml reads it (setuptools' dynamic version, parsed without importing
# the package) and mob_kernels.__version__ imports it.
__version__ = "0.2.0"
