"""DIMEE: early-exit based difficulty routing across mobile, edge and cloud (no Ray in here)."""
