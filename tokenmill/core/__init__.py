"""Pure-Python bookkeeping: sequences, pages and the scheduler. No torch here (a test enforces it)."""
