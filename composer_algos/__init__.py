"""composer-algos."""
