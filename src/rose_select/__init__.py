"""rose-select: reward-oriented data selection (ROSE) for task-specific instruction tuning."""

__version__ = "0.1.0"
