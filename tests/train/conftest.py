"""Fixtures shared by the end-to-end tests of the training app."""

import os

import pytest


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A small real-text corpus that does not change with the code under test: the standard library's email package."""
  import email

  folder = tmp_path_factory.mktemp("corpus")
  for dirpath, _, files in os.walk(os.path.dirname(email.__file__)):
    for name in sorted(files):
      if name.endswith(".py"):
        with open(os.path.join(dirpath, name)) as src:
          (folder / f"{os.path.basename(dirpath)}_{name}.txt").write_text(src.read())
  return str(folder)
