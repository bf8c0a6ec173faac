"""Exports of a finished run: adapter, merged model, GGUF, adapter merges, model cards, names.

The face of the package; ``exporter.export_run`` does the work (see its module for the
folders it writes). ``swarm merge`` is ``adapters_merge``.
"""

from swarm.export.exporter import Exported, export_run
from swarm.export.names import run_name, validate_name

__all__ = ["Exported", "export_run", "run_name", "validate_name"]
