"""Launchers for main.py: sweeps, XManager, GKE and local runs."""
