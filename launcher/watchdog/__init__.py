"""The watchdog script shipped to hosts (watchdog.sh)."""
