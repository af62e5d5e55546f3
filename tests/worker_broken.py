"""A worker module that fails to import (`asyncgrad worker W --import tests.worker_broken`)."""

raise RuntimeError("broken on purpose")
