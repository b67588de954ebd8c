"""Where jobs run: this process or Ray tasks, behind one small interface."""
