"""Engines behind one interface (gpu_runner.engines.base.Engine)."""
