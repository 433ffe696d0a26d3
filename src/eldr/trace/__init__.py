"""Request traces: the format (`format.py`), builders from real routing data, and statistics."""
