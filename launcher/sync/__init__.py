"""How bytes travel between the laptop and a host."""
