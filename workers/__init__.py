"""Worker modules that `asyncgrad worker NAME --import workers.MODULE` loads."""
