"""Offline analyses of trained artifacts, no cluster needed (`python -m analysis.mu_sweep`, ...)."""
