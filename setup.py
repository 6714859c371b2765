"""For pip versions without PEP 517 (RHEL 8's pip 9): the metadata is in setup.cfg."""

from setuptools import setup

setup()
