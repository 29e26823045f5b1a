"""How a machine starts, stops and bills: an always-on SSH box needs nothing; AWS EC2 is below."""
