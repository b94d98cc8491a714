#!/usr/bin/env python3
"""Test entry point (LocalAI's test.sh convention): runs the whole suite with pytest
against real servers and real models. Extra arguments go to pytest."""

import os
import sys

import pytest

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    os.chdir(here)
    sys.exit(pytest.main(["-q", "tests", *sys.argv[1:]]))
