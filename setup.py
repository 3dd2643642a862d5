"""The package list (everything else is in pyproject.toml). One mapping needs code: the shipped model lives in the
repository's top-level `assets/` and is installed as the package data `dlm/assets/` (dlm.model_registry looks in
both)."""
from setuptools import find_namespace_packages, setup

setup(packages=find_namespace_packages(include=["dlm*", "train*", "app*", "evals*", "bench*"]) + ["dlm.assets"],
      package_dir={"dlm.assets": "assets"})
