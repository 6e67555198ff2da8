"""Workflows: declarative YAML files (``*.yaml`` in this folder, plus any in
``BATON_WORKFLOWS_DIR``) validated at load time, run by ``GraphWorkflow``."""

from .graph import Done, GraphWorkflow, Next, StepPlan
from .spec import AgentSpec, WorkflowError, WorkflowSpec, load_dir, load_file, parse

__all__ = [
    "AgentSpec",
    "Done",
    "GraphWorkflow",
    "Next",
    "StepPlan",
    "WorkflowError",
    "WorkflowSpec",
    "load_dir",
    "load_file",
    "parse",
]
