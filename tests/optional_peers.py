"""The optional peers (kvpress, llama.cpp) in the tests: one rule for every test file.

`make test` installs both. Under CI (`.ci/run` sets CI=true) a test that needs a
peer always runs, so a missing peer is a failure, never a silent skip; elsewhere
such a test is skipped with the command that installs the peer.
"""

import os

import pytest

from streamkv.peers.installed import kvpress_python, llamacpp_version

IN_CI = bool(os.environ.get("CI"))
HAS_KVPRESS = kvpress_python() is not None
HAS_LLAMACPP = llamacpp_version() is not None
# what the tests expect of the machine: a peer is there, or CI says it must be
EXPECT_KVPRESS = HAS_KVPRESS or IN_CI
EXPECT_LLAMACPP = HAS_LLAMACPP or IN_CI

needs_kvpress = pytest.mark.skipif(not EXPECT_KVPRESS,
                                   reason="the kvpress environment is not installed (make setup-kvpress)")
needs_llamacpp = pytest.mark.skipif(not EXPECT_LLAMACPP,
                                    reason="llama-cpp-python is not installed (make setup-llamacpp)")
