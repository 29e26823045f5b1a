"""`gpu-run sweep`: many runs on one rented machine, queued on the machine itself."""
