"""The `segany` command line."""
