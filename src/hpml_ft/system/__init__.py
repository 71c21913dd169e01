"""The process a command runs in: CPU threads (threads.py), host memory handed back to the OS (allocator.py)
and how memory and speed are measured (measure.py). Imports nothing else of hpml_ft, so every layer may use it."""
