"""The default task: a CPU-sized alignment run that shows the cycle working (docs/default_task.md)."""
