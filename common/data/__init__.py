"""Data: readers of files and datasets, how users are cut from them (the protocol), and tasks."""
